"""Models that stream: a skeleton on the meta device whose weights are read from safetensors shards
one block at a time (docs/methods.md, "Streaming").

:func:`load_streamed` builds the model from its ``config.json`` under accelerate's
``init_empty_weights`` (no weight memory, whatever the size) and keeps a :class:`WeightIndex` of
every tensor in the folder's shards, read from their headers. The parts outside the blocks that a
capture runs (embeddings, position tables, final norm) are read once; each block's weights are
read with ``safe_open`` when the block runs and dropped back to the meta device after
(:meth:`StreamedWeights.block`). The LM head is never read: a capture runs the backbone only.

A streamed model is a :class:`~engine.loading.models.LoadedModel` like any other, with
``stream`` set. Tools that run on streamed models say so (``Tool.streams``); the others refuse a
streamed model in one line (:mod:`engine.running.runner`).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ..core.errors import GraftError

# bytes per element of the safetensors dtypes (header strings)
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


@dataclass(frozen=True)
class TensorEntry:
    file: str  # shard file name, in the folder
    dtype: str  # safetensors header dtype, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * DTYPE_BYTES.get(self.dtype, 4)


class WeightIndex:
    """Every tensor of a folder's safetensors shards: name -> file, dtype, shape. Headers only."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        self.entries: dict[str, TensorEntry] = {}
        files = weight_files(self.folder)
        if not files:
            raise GraftError(f"{self.folder} has no safetensors weights to stream")
        for f in files:
            try:
                with safe_open(str(f), "pt") as sf:
                    for k in sf.keys():
                        sl = sf.get_slice(k)
                        self.entries[k] = TensorEntry(f.name, str(sl.get_dtype()), tuple(sl.get_shape()))
            except Exception as exc:  # safetensors raises its own error type for a damaged header
                raise GraftError(f"cannot read the safetensors header of {f}: {exc}") from exc

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def key_for(self, name: str, prefix: str) -> Optional[str]:
        """The checkpoint key of the model's parameter ``name`` (with or without the base model's
        prefix, as transformers saves either)."""
        for k in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if k in self.entries:
                return k
        return None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files that hold a folder's model: the index's shards, or model.safetensors
    (other .safetensors files in the folder, such as saved bridges, are not the model's)."""
    from ..core.jsonio import read_json_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        listing = read_json_file(index)
        weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
        if not isinstance(weight_map, dict):
            raise GraftError(f"{index} is not a valid safetensors index (no weight_map)")
        return [folder / f for f in sorted(set(map(str, weight_map.values())))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def folder_weight_bytes(folder: Path) -> int:
    """Bytes of a folder's safetensors weights (headers only)."""
    return WeightIndex(folder).total_bytes


@dataclass
class StreamedWeights:
    """The link between a meta-device skeleton and its shards.

    ``block(l)`` is a context manager: block ``l``'s weights are read (in the run's dtype, on the
    run's device) on entry and dropped back to the meta device on exit, also when the work inside
    is cancelled or fails, so nothing stays behind."""

    index: WeightIndex
    model: Any
    blocks_path: str
    n_layers: int
    device: torch.device
    dtype: torch.dtype
    keys: dict[str, str]  # parameter name -> checkpoint key (every parameter the backbone runs)
    bytes_read: int = 0
    read_seconds: float = 0.0  # wall time spent reading (and converting) weights
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    on_read: Optional[Callable[[int], None]] = None  # called with the bytes of each read
    # (module, attribute, source module): the LM head tied into the embeddings shares their
    # parameter; re-pointed after every read and drop, which replace the embeddings' parameter
    tied: list[tuple[Any, str, Any]] = field(default_factory=list)
    # parameter name -> a function giving an update (float64, the parameter's shape) added on every
    # read, in float64 and rounded once to the run's dtype: a model plus an update (D = base + dW)
    # streams without a folder of its own
    adds: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)

    def _retie(self) -> None:
        for mod, attr, src in self.tied:
            setattr(mod, attr, getattr(src, attr))

    def block_params(self, l: int) -> list[str]:
        pre = f"{self.blocks_path}.{l}."
        return [n for n in self.keys if n.startswith(pre)]

    def block_bytes(self, l: int) -> int:
        return sum(self.index.entries[self.keys[n]].nbytes for n in self.block_params(l))

    def outside_params(self) -> list[str]:
        pre = f"{self.blocks_path}."
        return [n for n in self.keys if not n.startswith(pre)]

    def read(self, names: list[str]) -> None:
        """Read ``names`` into the skeleton (one ``safe_open`` per shard file)."""
        from accelerate.utils import set_module_tensor_to_device
        from safetensors import safe_open

        t0 = time.perf_counter()
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.index.entries[self.keys[n]].file, []).append(n)
        for fname, group in by_file.items():
            with safe_open(str(self.index.folder / fname), "pt") as sf:
                for n in group:
                    key = self.keys[n]
                    t = sf.get_tensor(key)
                    self.bytes_read += self.index.entries[key].nbytes
                    if not t.is_floating_point():
                        raise GraftError(
                            f"cannot stream {key}: it is stored as {t.dtype}, not floating point"
                        )
                    if n in self.adds:
                        t = (t.to(self.dtype).double() + self.adds[n]().to(t.device)).to(self.dtype)
                    set_module_tensor_to_device(self.model, n, self.device, value=t, dtype=self.dtype)
                    if self.on_read is not None:
                        self.on_read(self.index.entries[key].nbytes)
                    del t
        self._retie()
        self.read_seconds += time.perf_counter() - t0

    def drop(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for n in names:
            set_module_tensor_to_device(self.model, n, "meta")
        self._retie()

    @contextmanager
    def block(self, l: int) -> Iterator[None]:
        names = self.block_params(l)
        try:
            self.read(names)
            yield
        finally:
            self.drop(names)

    @contextmanager
    def outside(self) -> Iterator[None]:
        """The parts outside the blocks (embeddings, position tables, final norm) for a pass."""
        names = self.outside_params()
        try:
            self.read(names)
            yield
        finally:
            self.drop(names)


def backbone_param_names(model: Any) -> list[str]:
    """Parameters the backbone runs: all but the LM head's (unless tied into the embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    emb = model.get_input_embeddings()
    emb_ids = {id(p) for p in emb.parameters()}
    out = []
    seen: set[int] = set()
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in head_ids and id(p) not in emb_ids:
            continue
        if id(p) in seen:
            continue
        seen.add(id(p))
        out.append(n)
    return out


def skeleton(folder: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False) -> Any:
    """The model of ``folder``'s config.json, its parameters on the meta device (no weight memory),
    its buffers (rotary tables, masks) on ``device`` and, when floating, in ``dtype``, as
    ``model.to(device, dtype)`` leaves them for a model held whole."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .hf_folder import BUILD_LOCK, needs_custom_code

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        with BUILD_LOCK, init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        # as from_pretrained does: a tied head shares the embeddings' parameter (outside the context,
        # which would give the head a parameter of its own)
        model.tie_weights()
    except GraftError:
        raise
    except Exception as exc:  # transformers raises many types for a config it cannot build
        from .modelfiles import first_line

        msg = first_line(exc)
        if "trust_remote_code" in msg:
            raise needs_custom_code(folder.name) from exc
        raise GraftError(f"cannot build {folder.name} from its config.json: {msg}") from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for b in model.buffers():
        if b.device.type != "meta":
            b.data = b.data.to(device=device, dtype=dtype if b.is_floating_point() else b.dtype)
    return model


def attach_stream(
    model: Any, folder: Path, blocks_path: str, n_layers: int, device: torch.device, dtype: torch.dtype
) -> StreamedWeights:
    """The :class:`StreamedWeights` of a skeleton built from ``folder``; a one-line GraftError when a
    weight the backbone needs is not in the shards or has another shape."""
    index = WeightIndex(folder)
    prefix = getattr(model, "base_model_prefix", "") or ""
    keys: dict[str, str] = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for n in backbone_param_names(model):
        k = index.key_for(n, prefix)
        if k is None:
            raise GraftError(f"cannot stream {folder.name}: its weights have no tensor for {n}")
        if tuple(index.entries[k].shape) != tuple(params[n].shape):
            raise GraftError(
                f"cannot stream {folder.name}: {k} is {list(index.entries[k].shape)} in the weights, "
                f"config.json makes it {list(params[n].shape)}"
            )
        keys[n] = k
    st = StreamedWeights(index, model, blocks_path, n_layers, device, dtype, keys)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings()
    if head is not None and getattr(head, "weight", None) is getattr(emb, "weight", False):
        st.tied.append((head, "weight", emb))
    return st
