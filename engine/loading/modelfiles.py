"""Checks of model files before any loader reads them: one named line (GraftError) per problem.

Graft reads weights only from safetensors (and GGUF): a pickle can run code when it is loaded.
Every model folder is checked before transformers sees it, so a bad file is named in one line
instead of surfacing as an internal error; nothing here imports or unpickles.
"""

from __future__ import annotations

import json
import math
import mmap
import shlex
import struct
from pathlib import Path
from typing import Any

from ..core.errors import GraftError
from ..core.jsonio import read_json_file

SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit
_ST_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
_PICKLE_NAMES = ("pytorch_model.bin", "model.bin")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _size(n: float) -> str:
    """Human byte count: 12,000,000 bytes -> '12.0 MB'; huge header lengths -> 'EB'."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000:
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} EB"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _pickle_weights(folder: Path) -> list[Path]:
    """Weight files in ``folder`` stored as Python pickles, most likely weights first."""
    found = []
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        name = f.name.lower()
        if (
            name in _PICKLE_NAMES
            or (name.startswith("pytorch_model") and name.endswith(".bin"))
            or (
                name.endswith(_PICKLE_SUFFIXES)
                and name not in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")
            )
        ):
            found.append(f)
    return sorted(
        found,
        key=lambda f: (f.name.lower() not in _PICKLE_NAMES, not f.name.startswith("pytorch_model"), f.name),
    )


def convert_command(folder: Path) -> str:
    """One shell line that converts a pickled model folder to safetensors (``<folder>-safetensors``)."""
    src = str(folder)
    dst = src.rstrip("/\\") + "-safetensors"
    code = (
        "from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; "
        f"d, o = {json.dumps(src)}, {json.dumps(dst)}; "
        "M.from_pretrained(d, use_safetensors=False).save_pretrained(o); "
        "T.from_pretrained(d).save_pretrained(o)"
    )
    return f"python -c {shlex.quote(code)}"


def pickle_refusal(folder: Path, file: Path) -> GraftError:
    return GraftError(
        f"{file} holds the weights as a Python pickle, which can run arbitrary code when it is loaded, "
        "so Graft loads only safetensors; where you trust the file, convert it with: "
        f"{convert_command(folder)} "
        "and pass the new folder"
    )


def check_safetensors(path: Path) -> None:
    """Raise a one-line GraftError unless ``path`` is a complete, well-formed safetensors file.

    Reads only the header: an 8-byte little-endian header length, a JSON header object, and for
    every tensor a known dtype, a shape and ``data_offsets`` that match the dtype and shape and
    lie inside the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise GraftError(f"{path} is not a safetensors file (it has only {size:,} bytes, truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > SAFETENSORS_MAX_HEADER:
                raise GraftError(
                    f"{path} is not a safetensors file (its first 8 bytes give a header length of "
                    f"{_size(n)}; the format allows {_size(SAFETENSORS_MAX_HEADER)})"
                )
            if 8 + n > size:
                raise GraftError(
                    f"{path} is truncated: it ends inside its {n:,}-byte header (the file has {size:,} bytes)"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise GraftError(f"cannot read {path}: {first_line(exc)}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise GraftError(
            f"{path} is not a safetensors file (its header is not JSON: {first_line(exc)})"
        ) from None
    if not isinstance(header, dict):
        raise GraftError(f"{path} is not a safetensors file (its header is not a JSON object)")
    data = size - 8 - n
    end_max = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or not isinstance(shape, list)
            or not all(type(d) is int and d >= 0 for d in shape)
            or not isinstance(dtype, str)
        ):
            raise GraftError(
                f"{path} is corrupt: tensor '{key}' has no valid dtype, shape and data_offsets in the header"
            )
        start, end = offsets
        if end < start:
            raise GraftError(
                f"{path} is corrupt: tensor '{key}' ends (byte {end:,}) before it starts (byte {start:,})"
            )
        bits = _ST_BITS.get(dtype)
        if bits is not None:
            numel = math.prod(shape)
            if (numel * bits) % 8 == 0 and numel * bits // 8 != end - start:
                raise GraftError(
                    f"{path} is corrupt: tensor '{key}' ({dtype}, shape {shape}) needs "
                    f"{numel * bits // 8:,} bytes but its offsets span {end - start:,}"
                )
        end_max = max(end_max, end)
    if end_max > data:
        raise GraftError(
            f"{path} is truncated: its header lists {end_max:,} bytes of tensors but the file has "
            f"{max(data, 0):,} bytes after the header ({size:,} in all)"
        )


def check_model_folder(folder: Path) -> None:
    """Raise a one-line GraftError naming the file when a Hugging Face folder cannot be loaded safely:
    no or invalid ``config.json``, weights only as pickles (refused, never opened), a missing shard,
    or a truncated or malformed safetensors file. Reads headers only."""
    if not folder.is_dir():
        raise GraftError(f"model folder not found: {folder}")
    config = folder / "config.json"
    if not config.is_file():
        raise GraftError(f"{folder} is not a Hugging Face model folder (no config.json)")
    cfg = read_json_file(config)
    if not isinstance(cfg, dict):
        raise GraftError(f"{config} is not a JSON object")
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        try:
            listing = read_json_file(index)
        except GraftError as exc:
            raise GraftError(f"{index} is not a valid safetensors index ({exc})") from None
        weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(v, str) for v in weight_map.values())
        ):
            raise GraftError(
                f"{index} is not a valid safetensors index (no weight_map of tensor -> shard file)"
            )
        for shard in sorted(set(weight_map.values())):
            f = folder / shard
            # By name, not resolved: hub snapshots link their files to blobs outside the folder.
            if Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise GraftError(f"{index} lists a shard outside its folder: {shard}")
            if not f.is_file():
                raise GraftError(f"{index} lists the shard {shard}, which is missing from {folder}")
            check_safetensors(f)
        return
    if single.is_file():
        check_safetensors(single)
        return
    pickles = _pickle_weights(folder)
    if pickles:
        raise pickle_refusal(folder, pickles[0])
    others = sorted(f.name for f in folder.glob("*.safetensors"))
    if others:
        raise GraftError(
            f"{folder} has no model.safetensors (nor model.safetensors.index.json), only "
            f"{', '.join(others[:3])}"
        )
    raise GraftError(f"{folder} has no model weights (no model.safetensors or model.safetensors.index.json)")


# GGUF value types (gguf.GGUFValueType): fixed sizes; 8 = string, 9 = array.
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Cut(Exception):
    """The GGUF header asks for more bytes than the file has."""


def check_gguf(path: Path) -> None:
    """Raise a one-line GraftError unless ``path`` is a readable GGUF v2/v3 file whose header is
    complete and whose tensors lie inside the file. Walks the header only (no tensor data read)."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(24)
            if not head:
                raise GraftError(f"cannot read GGUF {name}: the file is empty")
            if head[:4] != b"GGUF" and (len(head) >= 4 or not b"GGUF".startswith(head)):
                raise GraftError(
                    f"cannot read GGUF {name}: not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')"
                )
            if len(head) < 8:
                raise GraftError(
                    f"cannot read GGUF {name}: cut inside its header (the file has {size:,} bytes)"
                )
            (version,) = struct.unpack_from("<I", head, 4)
            if version not in (2, 3):
                raise GraftError(
                    f"cannot read GGUF {name}: unsupported GGUF version {version} (2 and 3 are supported)"
                )
            if len(head) < 24:
                raise GraftError(
                    f"cannot read GGUF {name}: cut inside its header (the file has {size:,} bytes)"
                )
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                _walk_gguf(name, mm, size)
    except OSError as exc:
        raise GraftError(f"cannot read GGUF {name}: {first_line(exc)}") from exc


def _walk_gguf(name: str, mm: Any, size: int) -> None:
    import gguf  # pure Python; only its table of quantisation block sizes is used

    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", mm, 8)
    where = "the key/value count"

    def take(n: int) -> int:
        nonlocal pos
        if n < 0 or pos + n > size:
            raise _Cut()
        start = pos
        pos += n
        return start

    def u(fmt: str) -> int:
        return struct.unpack_from(fmt, mm, take(struct.calcsize(fmt)))[0]

    def string() -> str:
        n = u("<Q")
        start = take(n)
        return bytes(mm[start : start + n]).decode("utf-8", "replace")

    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    known = {int(t) for t in gguf.GGMLQuantizationType}
    try:
        if n_kv >= 1 << 32 or n_tensors >= 1 << 32:
            raise GraftError(
                f"cannot read GGUF {name}: corrupt header ({n_kv:,} keys and {n_tensors:,} tensors in a "
                f"{size:,}-byte file)"
            )
        for i in range(n_kv):
            where = f"key {i + 1} of {n_kv}"
            key = string()
            where = f"key '{key}'"
            vtype = u("<I")
            if vtype in _GGUF_FIXED:
                start = take(_GGUF_FIXED[vtype])
                if key == "general.alignment" and vtype in (4, 5):
                    alignment = struct.unpack_from("<I", mm, start)[0] or alignment
            elif vtype == 8:
                string()
            elif vtype == 9:
                itype, count = u("<I"), u("<Q")
                if itype in _GGUF_FIXED:
                    take(_GGUF_FIXED[itype] * count)
                elif itype == 8:
                    if count > size:
                        raise _Cut()
                    for _ in range(count):
                        take(u("<Q"))
                else:
                    raise GraftError(
                        f"cannot read GGUF {name}: corrupt header ({where} is an array of unknown type "
                        f"{itype})"
                    )
            else:
                raise GraftError(
                    f"cannot read GGUF {name}: corrupt header ({where} has unknown value type {vtype})"
                )
        ends = []
        for i in range(n_tensors):
            where = f"tensor {i + 1} of {n_tensors}"
            tname = string()
            where = f"tensor '{tname}'"
            n_dims = u("<I")
            if n_dims > 8:
                raise GraftError(f"cannot read GGUF {name}: corrupt header ({where} has {n_dims} dimensions)")
            dims = [u("<Q") for _ in range(n_dims)]
            ttype, offset = u("<I"), u("<Q")
            block = gguf.GGML_QUANT_SIZES.get(gguf.GGMLQuantizationType(ttype)) if ttype in known else None
            if block is None:
                raise GraftError(
                    f"cannot read GGUF {name}: corrupt header ({where} has unknown tensor type {ttype})"
                )
            block_size, type_size = block
            ends.append(offset + math.prod(dims) // block_size * type_size)
    except _Cut:
        raise GraftError(
            f"cannot read GGUF {name}: cut inside its header (reading {where}; the file has {size:,} bytes)"
        ) from None
    data_start = (pos + alignment - 1) // alignment * alignment
    need = data_start + max(ends, default=0)
    if need > size:
        raise GraftError(
            f"cannot read GGUF {name}: truncated (its header lists tensors up to byte {need:,} "
            f"but the file has {size:,} bytes)"
        )
