"""Model specs, built-in models, loading, and a process-wide cache of loaded models.

A :class:`ModelSpec` is hashable and resolves one of:

* a built-in name (``smollm2-135m-instruct``, ``smollm2-135m-instruct+concept``, ``gemma3-270m``,
  ``tiny-gpt2-a`` ...);
* a local Hugging Face folder (safetensors weights only: pickled weights are refused, never loaded),
  including Graft's own outputs: a saved transplant (``surgery.json``) is one already, and a
  ``make-donor`` folder (``merged/``, ``adapter/``, ``card.json``) resolves to its ``merged/`` model;
* a GGUF file (dequantised once into a safetensors cache);
* a hub id (``org/name``), read from the local HF cache only — Graft never downloads.

Loaded models are shared between pages and jobs and must never be mutated: transplants work on
copies of the tensors they touch. Beside this module: :mod:`engine.loading.model_folders` (what a folder
on disk is, provenance cards), :mod:`engine.loading.gguf` (GGUF packages, dequantisation) and
:mod:`engine.loading.hf_folder` (reading a folder with transformers).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..core.errors import GraftError
from ..core.progress import Progress, silent
from .arch import ArchAdapter
from .bridged import attach_saved_bridges
from .builtins import (
    BUILTIN_DESCRIPTIONS,
    DEMO_DONOR,
    GEMMA3,
    SMOLLM2,
    demo_donor_dir,
    demo_donor_ready,
    prepare_gemma3,
    prepare_smollm2,
)
from .gguf import gguf_folder
from .hf_folder import BUILD_LOCK, cached_hub_folder, read_model_folder
from .model_folders import DONOR_MERGED, donor_card, folder_card, local_folder, model_path_kind, read_json
from .tiny import TINY_MODELS, build_tiny

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelSpec:
    """What model to load. Hashable, so it keys caches."""

    kind: str  # "builtin" | "path" | "gguf" | "hub"
    ref: str
    trust_remote_code: bool = False

    @classmethod
    def parse(cls, text: str, trust_remote_code: bool = False) -> "ModelSpec":
        """Resolve a user string: built-in name, folder, .gguf file, or hub id."""
        text = (text or "").strip()
        if not text:
            raise GraftError("no model given")
        if text in BUILTIN_DESCRIPTIONS:
            return cls("builtin", text, trust_remote_code)
        p = Path(text).expanduser()
        if os.path.exists(p):  # False, not OSError, for a name too long for the file system
            kind, ref = model_path_kind(p.resolve())
            return cls(kind, ref, trust_remote_code)
        if (
            text.startswith(("/", ".", "~"))
            or text.endswith(".gguf")
            or os.sep in text
            and not _HUB_ID.match(text)
        ):
            raise GraftError(f"model path not found: {text}")
        if _HUB_ID.match(text):
            return cls("hub", text, trust_remote_code)
        raise GraftError(
            f"unknown model '{text}': use a built-in name ({', '.join(sorted(BUILTIN_DESCRIPTIONS))}), "
            "a local folder, a .gguf file or a hub id in the local cache"
        )

    @property
    def label(self) -> str:
        if self.kind in ("path", "gguf"):
            p = Path(self.ref)
            if p.name == DONOR_MERGED and p.parent.name:  # a make-donor folder's model: "mydonor/merged"
                return f"{p.parent.name}/{p.name}"
            return p.name
        return self.ref

    def __str__(self) -> str:
        return self.ref


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer and adapter. Shared; never mutate ``model``."""

    spec: ModelSpec
    model: Any
    tokenizer: Any
    arch: ArchAdapter
    device: torch.device
    dtype: torch.dtype
    source: str  # folder the weights came from ("" for in-process tiny models)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # engine.loading.stream.StreamedWeights when the model streams (its parameters on the meta device,
    # read from ``source`` block by block); None when it is held whole
    stream: Any = None
    # accelerate's placement when the model was loaded with device_map="auto" (engine/loading/dispatch.py):
    # the device map and bytes per tier; None otherwise
    placement: Optional[dict[str, Any]] = None

    @property
    def streamed(self) -> bool:
        return self.stream is not None

    @property
    def dispatched(self) -> bool:
        return self.placement is not None

    @property
    def label(self) -> str:
        return self.spec.label

    def state_hash(self) -> str:
        """SHA-256 over all parameters and buffers (names, dtypes, bytes)."""
        if self.streamed or self.dispatched:
            raise GraftError(
                f"internal: {self.label} is not held whole; its weights are not in memory to hash"
            )
        return state_dict_hash(self.model.state_dict())


def state_dict_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    seen: set[int] = set()
    for name in sorted(state):
        t = state[name]
        key = t.data_ptr()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        if key in seen and key != 0:
            h.update(b"tied")
            continue
        seen.add(key)
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------- devices
def resolve_device(device: str = "auto") -> torch.device:
    if device in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GraftError("--device cuda requested but no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise GraftError(f"unknown device '{device}': use auto, cpu or cuda")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str = "float32") -> torch.dtype:
    if dtype not in _DTYPES:
        raise GraftError(f"unknown dtype '{dtype}': use {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


# --------------------------------------------------------------------------- provenance, remote code
def remote_code_files(spec: ModelSpec) -> list[str]:
    """What would run if the user trusted this model's code: every ``auto_map`` entry of its
    ``config.json`` / ``tokenizer_config.json`` (``"config.json auto_map AutoModelForCausalLM:
    modeling_x.XForCausalLM"``) and every ``.py`` file in its folder (relative paths). Built-in
    models and GGUF caches have none; a hub id is looked up in the local cache only.

    Reads files as text; never imports or executes anything."""
    folder = local_folder(spec)
    if folder is None or not folder.is_dir():
        return []
    out: list[str] = []
    for fname in (
        "config.json",
        "tokenizer_config.json",
        "processor_config.json",
        "preprocessor_config.json",
    ):
        data = read_json(folder / fname)
        amap = data.get("auto_map") if isinstance(data, dict) else None
        if isinstance(amap, dict):
            for key in sorted(amap):
                value = amap[key]
                if isinstance(value, (list, tuple)):
                    value = ", ".join(str(v) for v in value if v)
                out.append(f"{fname} auto_map {key}: {value}")
    py = []
    for f in folder.rglob("*.py"):  # hub snapshots hold links to blobs: kept (is_file follows them)
        rel = f.relative_to(folder)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts) or not f.is_file():
            continue
        py.append(rel.as_posix())
    return out + sorted(py)


def model_card(spec: ModelSpec) -> Optional[dict[str, Any]]:
    """Graft's own provenance card for a model made by Graft, for the sidebar; None otherwise.

    ``{"kind": "make-donor", "path": <donor folder>, "summary": <one line>, "card": <card.json>}``
    for a make-donor folder (or the built demo donor), ``{"kind": "transplant", "path": <folder>,
    ..., "card": <surgery.json>}`` for a saved transplant. An unreadable card gives ``card: {}``
    and says so in the summary."""
    if spec.kind == "path":
        return folder_card(Path(spec.ref))
    if spec.kind == "builtin" and spec.ref == DEMO_DONOR and demo_donor_ready():
        return donor_card(demo_donor_dir())
    return None


# --------------------------------------------------------------------------- loading
def check_vocab(spec: ModelSpec, model: Any, tok: Any) -> None:
    """A one-line GraftError when the tokenizer has ids the embedding table cannot look up."""
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None)
    if isinstance(rows, int) and len(tok) > rows:
        raise GraftError(
            f"{spec.label}: its tokenizer has {len(tok)} tokens but the model's embedding table only "
            f"{rows} "
            f"rows, so token ids from {rows} on cannot be looked up (a tokenizer from another model?)"
        )


def _finish(
    spec: ModelSpec, model: Any, tok: Any, device: torch.device, dtype: torch.dtype, source: str
) -> LoadedModel:
    check_vocab(spec, model, tok)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device=device, dtype=dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return LoadedModel(spec, model, tok, ArchAdapter(model), device, dtype, source)


def load_folder(
    spec: ModelSpec, folder: Path, device: torch.device, dtype: torch.dtype, **kw: Any
) -> LoadedModel:
    """Load a Hugging Face folder (:func:`engine.loading.hf_folder.read_model_folder`: checked first, then
    safetensors only) and re-attach a saved bridged organ transplant's bridges."""
    where = str(folder) if spec.kind in ("path", "hub") else spec.label
    model, tok = read_model_folder(
        folder, dtype, label=spec.label, where=where, trust_remote_code=spec.trust_remote_code, **kw
    )
    attach_saved_bridges(model, folder)  # a saved bridged organ transplant keeps its bridges as modules
    return _finish(spec, model, tok, device, dtype, str(folder))


def load_streamed(spec: ModelSpec, folder: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A model that streams from ``folder`` (:mod:`engine.loading.stream`): a meta-device skeleton,
    its tokenizer, and the index of its shards; no weights are read here."""
    from .bridged import BRIDGES_FILE
    from .hf_folder import read_tokenizer
    from .modelfiles import check_model_folder
    from .stream import attach_stream, skeleton

    check_model_folder(folder)
    if (folder / BRIDGES_FILE).is_file():
        raise GraftError(
            f"{spec.label} is a bridged organ transplant: its bridges run between blocks, so it is held "
            "whole, not streamed (--stream off)"
        )
    where = str(folder) if spec.kind in ("path", "hub") else spec.label
    model = skeleton(folder, device, dtype, spec.trust_remote_code)
    tok = read_tokenizer(folder, label=spec.label, where=where, trust_remote_code=spec.trust_remote_code)
    arch = ArchAdapter(model)
    st = attach_stream(model, folder, arch.blocks_path, arch.n_layers, device, dtype)
    check_vocab(spec, model, tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return LoadedModel(spec, model, tok, arch, device, dtype, str(folder), stream=st)


def model_folder(spec: ModelSpec, progress: Optional[Progress] = None) -> Optional[Path]:
    """The Hugging Face folder a model's weights are read from (built-ins prepared first); None for
    an in-process tiny model."""
    progress = progress or silent()
    if spec.kind == "builtin":
        if spec.ref in TINY_MODELS:
            return None
        if spec.ref == SMOLLM2:
            return prepare_smollm2(progress)
        if spec.ref == DEMO_DONOR:
            if not demo_donor_ready():
                raise GraftError(
                    f"the demo donor {DEMO_DONOR} is not built yet: build it with python -m engine prepare "
                    "or the Build button on the app's Start page (a few minutes, once)"
                )
            return demo_donor_dir() / "merged"
        if spec.ref == GEMMA3:
            return prepare_gemma3(progress)
        return None
    if spec.kind == "path":
        return Path(spec.ref)
    if spec.kind == "gguf":
        return gguf_folder(Path(spec.ref), progress)
    if spec.kind == "hub":
        return cached_hub_folder(spec.ref)
    return None


def load_model(
    spec: ModelSpec,
    device: str | torch.device = "auto",
    dtype: str = "float32",
    progress: Optional[Progress] = None,
    stream: bool = False,
    dispatch: Optional[dict[str, int]] = None,
) -> LoadedModel:
    """Load a model (uncached). Use :class:`ModelStore` to share loaded models. ``stream``: a
    streamed model (:func:`load_streamed`) instead of one held whole; ``dispatch``: a per-device
    memory map, for a model placed by accelerate (:mod:`engine.loading.dispatch`)."""
    progress = progress or silent()
    if stream or dispatch:
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        if spec.kind == "builtin" and spec.ref in TINY_MODELS:
            raise GraftError(f"{spec.ref} is built in memory, not read from a folder: it cannot stream")
        folder = model_folder(spec, progress.sub(0, 0.8))
        if folder is None:
            raise GraftError(
                f"hub model {spec.ref} is not in the local Hugging Face cache and Graft never downloads"
            )
        if dispatch:
            from .dispatch import load_dispatched_model

            return load_dispatched_model(spec, folder, resolve_dtype(dtype), dispatch)
        return load_streamed(spec, folder, dev, resolve_dtype(dtype))
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype)
    if spec.kind == "builtin":
        if spec.ref in TINY_MODELS:
            with BUILD_LOCK:
                model, tok = build_tiny(spec.ref)
            return _finish(spec, model, tok, dev, dt, "")
        if spec.ref == SMOLLM2:
            folder = prepare_smollm2(progress.sub(0, 0.8))
        elif spec.ref == DEMO_DONOR:
            if not demo_donor_ready():  # loading never trains: building the donor is an action of its own
                raise GraftError(
                    f"the demo donor {DEMO_DONOR} is not built yet: build it with python -m engine prepare "
                    "or the Build button on the app's Start page (a few minutes, once)"
                )
            folder = demo_donor_dir() / "merged"
        elif spec.ref == GEMMA3:
            folder = prepare_gemma3(progress.sub(0, 0.8))
        else:  # pragma: no cover - parse() only admits known names
            raise GraftError(f"unknown built-in model {spec.ref}")
        progress(0.9, f"loading {spec.ref}")
        try:
            return load_folder(spec, folder, dev, dt)
        except (
            GraftError
        ) as exc:  # the cache was damaged on disk (it is written atomically): say how to rebuild it
            cache = demo_donor_dir() if spec.ref == DEMO_DONOR else folder
            raise GraftError(
                f"{exc} (Graft's cache of {spec.ref}: delete {cache} and run python -m engine prepare"
                f"{' --gemma' if spec.ref == GEMMA3 else ''} to rebuild it)"
            ) from exc
    if spec.kind == "path":
        return load_folder(spec, Path(spec.ref), dev, dt)
    if spec.kind == "gguf":
        return load_folder(spec, gguf_folder(Path(spec.ref), progress), dev, dt)
    if spec.kind == "hub":
        folder = cached_hub_folder(spec.ref)
        if folder is None:  # huggingface_hub raises several types for "not cached"
            raise GraftError(
                f"hub model {spec.ref} is not in the local Hugging Face cache and Graft never downloads: "
                "fetch it on a connected machine or pass a local folder"
            )
        return load_folder(spec, folder, dev, dt)
    raise GraftError(f"unknown model kind {spec.kind}")


class ModelStore:
    """Process-wide cache of loaded models keyed by (spec, device, dtype).

    Loading the same key twice concurrently loads once (per-key lock). Least recently used
    models are dropped past ``max_models``.
    """

    def __init__(self, max_models: int = 4) -> None:
        self.max_models = max_models
        self._models: "OrderedDict[tuple, LoadedModel]" = OrderedDict()
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()
        self.on_evict: list[
            Callable[[LoadedModel], None]
        ] = []  # e.g. the app's live transplants on it go too

    def get(
        self,
        spec: ModelSpec,
        device: str = "auto",
        dtype: str = "float32",
        progress: Optional[Progress] = None,
        stream: bool = False,
        dispatch: Optional[dict[str, int]] = None,
        dispatch_key: str = "",
    ) -> LoadedModel:
        """``dispatch``: accelerate's per-device map for a placed model. A model placed once is
        reused for the same ``dispatch_key`` (the run's --max-memory), whatever map a later plan
        derives from the memory free then, so runs do not place the pair again."""
        dev = resolve_device(device)
        key = (spec, str(dev), dtype) + (("stream",) if stream else ())
        if dispatch:  # placed once per budget the user set: the derived map moves with free memory
            key += (("dispatch", dispatch_key),)
        with self._guard:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                if key in self._models:
                    return self._models[key]
            kw: dict[str, Any] = {"stream": True} if stream else {}
            if dispatch:
                kw["dispatch"] = dispatch
            loaded = load_model(spec, dev, dtype, progress, **kw)
            with self._guard:
                self._models[key] = loaded
                evicted = [
                    self._models.popitem(last=False)[1] for _ in range(len(self._models) - self.max_models)
                ]
            for gone in evicted:
                for hook in self.on_evict:
                    hook(gone)
            return loaded

    def loaded(self) -> list[tuple]:
        with self._guard:
            return list(self._models)
