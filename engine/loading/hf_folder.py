"""Hugging Face model folders: read one into a transformers model and tokenizer, checked first and
from safetensors only (:func:`read_model_folder`), and find a hub id's folder in the local cache
(:func:`cached_hub_folder`; Graft never downloads).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

import torch

from ..core.errors import GraftError
from .modelfiles import check_model_folder, first_line

# One model is built at a time in this process: transformers' from_pretrained is not safe in two
# threads at once (the app's two background loads of the demo pair failed every time with "Cannot
# copy out of meta tensor"). Held only while a model is built, never while it is prepared or used.
BUILD_LOCK = threading.RLock()


def needs_custom_code(label: str) -> GraftError:
    return GraftError(f"{label} needs custom code: turn on 'trust remote code' only if you trust it")


def read_model_folder(
    folder: Path,
    dtype: torch.dtype,
    *,
    label: str,
    where: str,
    trust_remote_code: bool = False,
    model_kw: Optional[dict[str, Any]] = None,
    **kw: Any,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a Hugging Face folder: checked first (:func:`check_model_folder`),
    then loaded from safetensors only (``use_safetensors=True``: transformers never falls back to a
    pickle). Failures caused by the folder's content become one-line GraftErrors naming ``where``
    (``label`` when the model needs custom code). ``model_kw`` goes to the model's loader alone
    (accelerate's placement: :mod:`engine.loading.dispatch`)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_model_folder(folder)
    try:
        with BUILD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(
                str(folder),
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
                **kw,
                **(model_kw or {}),
            )
    except GraftError:
        raise
    except (
        ValueError,
        OSError,
        KeyError,
        RuntimeError,
        TypeError,
        AttributeError,
        IndexError,
        NotImplementedError,
        SafetensorError,
    ) as exc:
        msg = first_line(exc)
        if "trust_remote_code" in msg:
            raise needs_custom_code(label) from exc
        mismatch = _shape_mismatch(folder) if "mismatched_sizes" in msg else None
        if mismatch:
            raise GraftError(
                f"cannot load {where}: its weights do not fit its config.json ({mismatch})"
            ) from exc
        raise GraftError(f"cannot load {where}: {type(exc).__name__}: {msg}") from exc
    return model, read_tokenizer(folder, label=label, where=where, trust_remote_code=trust_remote_code, **kw)


def read_tokenizer(
    folder: Path, *, label: str, where: str, trust_remote_code: bool = False, **kw: Any
) -> Any:
    """The tokenizer of a Hugging Face folder; one-line GraftErrors for what the folder gets wrong."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kw)
    except GraftError:
        raise
    except Exception as exc:  # the tokenizers library raises bare Exception for a malformed tokenizer.json
        msg = first_line(exc)
        if "trust_remote_code" in msg:
            raise needs_custom_code(label) from exc
        raise GraftError(f"cannot load the tokenizer of {where}: {type(exc).__name__}: {msg}") from exc
    if not tok("Hello, world.", add_special_tokens=False)["input_ids"]:  # transformers builds an empty one
        raise GraftError(
            f"{where} has no usable tokenizer (no tokenizer.json, tokenizer.model or vocab files there): "
            "every text would be zero tokens; copy its base model's tokenizer files into the folder"
        )
    return tok


def _shape_mismatch(folder: Path) -> Optional[str]:
    """The first weight whose shape in the folder's safetensors headers is not the one its config.json
    gives the model (built on the meta device: no memory, whatever the config asks for), as one
    phrase; None when none is found. transformers only says "look at the above report" then."""
    try:
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        shapes: dict[str, tuple[int, ...]] = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                shapes.update({k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
        prefix = model.base_model_prefix
        for name, t in model.state_dict().items():
            key = next(
                (k for k in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}") if k in shapes), None
            )
            if key is not None and shapes[key] != tuple(t.shape):
                dims = lambda s: " x ".join(map(str, s))  # noqa: E731
                return f"{key} is {dims(shapes[key])} in the weights, config.json makes it {dims(t.shape)}"
    except Exception:  # a best effort for the message only: the load has failed already
        return None
    return None


def cached_hub_folder(ref: str) -> Optional[Path]:
    """The local Hugging Face cache's snapshot folder of hub id ``ref``; None when it is not cached."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # huggingface_hub raises several types for "not cached"
        return None


def cached_hub_models() -> list[str]:
    """Causal-LM repos present in the local HF cache (for the model picker)."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:
        return []
    return sorted(r.repo_id for r in info.repos if r.repo_type == "model")
