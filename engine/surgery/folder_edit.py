"""Saving an edited model as a folder without ever holding it (docs/methods.md, "Streaming").

A transplant on a streamed pair changes a few tensors of the target. :class:`FolderEdit` writes T'
from the target's own folder:

* every file of the target folder (config, tokenizer, shards, index) is hard-linked into the new
  folder, or copied when the two are on different file systems;
* the first time a tensor of a shard changes, that shard's link is replaced by a copy (made by the
  kernel, ``os.copy_file_range``: no bytes pass through this process), and the tensor's bytes are
  written over the copy at the offset its header gives. Shapes and dtypes never change, so the
  header, the index and every other tensor stay as they were.

The result is an ordinary safetensors folder with each key stored once (transformers reads every key
of every shard, so an extra "override" shard beside stale copies would depend on file order). A
linked file is never opened for writing: its inode is checked before each patch. Memory is one
tensor at a time; disk is the patched shards only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..core.errors import GraftError
from ..core.paths import discard_staging, replace_dir, staging_dir
from ..loading.model_folders import SURGERY_CARD
from ..loading.stream import WeightIndex

SURGERY_FORMAT = "graft-surgery/1"
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def tensor_span(path: Path, key: str) -> tuple[int, int]:
    """(absolute byte offset, byte length) of ``key``'s data in the safetensors file ``path``."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    entry = header.get(key)
    if not isinstance(entry, dict) or "data_offsets" not in entry:
        raise GraftError(f"{path.name} has no tensor {key}")
    a, b = (int(x) for x in entry["data_offsets"])
    return 8 + n + a, b - a


def _copy_file(src: Path, dst: Path) -> None:
    """Copy in the kernel (reflinked where the file system can), never through this process's memory."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        left = os.fstat(fi.fileno()).st_size
        while left > 0:
            try:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), min(left, 1 << 30))
            except OSError:  # a file system without it: plain copy in chunks
                fi.seek(os.fstat(fi.fileno()).st_size - left)
                shutil.copyfileobj(fi, fo, 16 << 20)
                return
            if n == 0:
                break
            left -= n


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` to ``dst`` (True), or copy it when a link is impossible (False)."""
    try:
        os.link(src, dst)
        return True
    except OSError:
        _copy_file(src, dst)
        return False


class FolderEdit:
    """T' as a folder: the target's files linked, the changed tensors written into copied shards."""

    def __init__(self, base: Path, out: Path) -> None:
        from .transplant import check_out_dir

        self.base = Path(base).resolve()
        self.out = Path(out).expanduser().resolve()
        if self.out == self.base or self.base in self.out.parents or self.out in self.base.parents:
            raise GraftError(f"save T' outside the target's folder {self.base}, not at {self.out}")
        check_out_dir(self.out)
        self.index = WeightIndex(self.base)
        self.tmp = staging_dir(self.out)
        self.linked_bytes = 0
        self.copied_bytes = 0
        self.written_bytes = 0
        self.patched: set[str] = set()
        self.changed: dict[str, str] = {}  # key -> sha256 of the bytes written
        try:
            for src in sorted(self.base.iterdir()):
                if src.name == SURGERY_CARD or src.name.startswith("."):
                    continue
                dst = self.tmp / src.name
                if src.is_dir():
                    shutil.copytree(src, dst, copy_function=lambda s, d: _link_or_copy(Path(s), Path(d)))
                elif src.is_file():
                    size = src.stat().st_size
                    if _link_or_copy(src, dst):
                        self.linked_bytes += size
                    else:
                        self.copied_bytes += size
        except BaseException:
            discard_staging(self.tmp)
            raise

    def write(self, key: str, value: torch.Tensor) -> None:
        """Store ``value`` as tensor ``key`` of T' (same shape; cast to the stored dtype)."""
        entry = self.index.entries.get(key)
        if entry is None:
            raise GraftError(f"the target's weights have no tensor {key}")
        if tuple(value.shape) != tuple(entry.shape):
            raise GraftError(f"cannot write {key}: shape {list(value.shape)}, stored {list(entry.shape)}")
        dtype = TORCH_DTYPES.get(entry.dtype)
        if dtype is None:
            raise GraftError(f"cannot write {key}: it is stored as {entry.dtype}, not floating point")
        stored = value.detach().to("cpu", dtype).contiguous()
        if not bool(torch.isfinite(stored).all()):
            raise GraftError(f"refusing to write {key}: it has non-finite values in {entry.dtype}")
        data = stored.view(torch.uint8).reshape(-1).numpy()  # a view: no second copy
        src, dst = self.base / entry.file, self.tmp / entry.file
        if entry.file not in self.patched:
            size = dst.stat().st_size
            if dst.stat().st_ino == src.stat().st_ino:
                self.linked_bytes -= size
            else:
                self.copied_bytes -= size
            dst.unlink()
            _copy_file(src, dst)
            self.copied_bytes += size
            self.patched.add(entry.file)
        if dst.stat().st_ino == src.stat().st_ino:  # pragma: no cover - guard: never write a link
            raise GraftError(f"internal: {dst} is still a link to the target's {src}")
        offset, n = tensor_span(dst, key)
        if n != data.nbytes:
            raise GraftError(f"internal: {key} spans {n} bytes in {entry.file}, its value {data.nbytes}")
        with open(dst, "r+b") as f:
            f.seek(offset)
            f.write(data)
        self.written_bytes += n
        self.changed[key] = hashlib.sha256(data).hexdigest()

    def verify(self) -> None:
        """Read every written tensor back from the new folder and compare its bytes."""
        for key, digest in self.changed.items():
            if tensor_digest(self.tmp / self.index.entries[key].file, key) != digest:
                raise GraftError(f"internal: {key} did not read back as written")

    def changed_hash(self) -> str:
        return _combine(self.changed)

    def finish(self, card: dict[str, Any]) -> Path:
        """Verify and write ``surgery.json``; the folder stays staged (returned) until :meth:`commit`,
        so a run that decides against T' after evaluating it leaves the destination as it was."""
        self.verify()
        payload = {
            "format": SURGERY_FORMAT,
            **card,
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "saved_as": "changed tensors in copied shards; other files hard-linked from the target",
            "changed_tensors_sha256": self.changed_hash(),
            "changed_tensors": sorted(self.changed),
            "files": self.summary(),
        }
        try:
            text = json.dumps(payload, indent=2, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise GraftError(f"surgery card is not strict JSON: {e}") from None
        (self.tmp / SURGERY_CARD).write_text(text)
        return self.tmp

    def commit(self) -> Path:
        """Move the staged folder into place (an existing transplant there is replaced only now)."""
        from .transplant import check_out_dir

        try:
            check_out_dir(self.out)
            replace_dir(self.tmp, self.out)
        finally:
            discard_staging(self.tmp)
        return self.out

    def abort(self) -> None:
        discard_staging(self.tmp)

    def summary(self) -> dict[str, Any]:
        return {
            "tensors_written": len(self.changed),
            "changed_tensors_sha256": self.changed_hash(),
            "bytes_written": self.written_bytes,
            "shards_copied": len(self.patched),
            "bytes_copied": self.copied_bytes,
            "bytes_linked": self.linked_bytes,
        }


def tensor_digest(path: Path, key: str) -> str:
    """SHA-256 of tensor ``key``'s stored bytes in the safetensors file ``path``."""
    offset, n = tensor_span(path, key)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = n
        while left:
            chunk = f.read(min(left, 64 << 20))
            if not chunk:
                raise GraftError(f"{path.name} ends inside {key}")
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _combine(digests: dict[str, str]) -> str:
    h = hashlib.sha256()
    for key in sorted(digests):
        h.update(key.encode())
        h.update(digests[key].encode())
    return h.hexdigest()


def changed_hash_of(folder: Path, keys: list[str]) -> str:
    """The ``changed_tensors_sha256`` of a saved folder, read again from its files: the same digest
    :meth:`FolderEdit.changed_hash` gave when the tensors ``keys`` were written."""
    index = WeightIndex(Path(folder))
    missing = [k for k in keys if k not in index.entries]
    if missing:
        raise GraftError(f"{Path(folder).name} has no tensor {missing[0]}")
    return _combine({k: tensor_digest(index.folder / index.entries[k].file, k) for k in keys})


def read_tensor(index: WeightIndex, key: str) -> torch.Tensor:
    """One tensor of a folder, as stored."""
    from safetensors import safe_open

    entry = index.entries.get(key)
    if entry is None:
        raise GraftError(f"{index.folder.name} has no tensor {key}")
    with safe_open(str(index.folder / entry.file), "pt") as sf:
        return sf.get_tensor(key)
