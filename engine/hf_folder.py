"""Hugging Face model folders: read one into a transformers model and tokenizer, checked first and
from safetensors only (:func:`read_model_folder`), and find a hub id's folder in the local cache
(:func:`cached_hub_folder`; Graft never downloads).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import GraftError
from .modelfiles import _first_line, check_model_folder


# One model is built at a time in this process: transformers' from_pretrained is not safe in two
# threads at once (the app's two background loads of the demo pair failed every time with "Cannot
# copy out of meta tensor"). Held only while a model is built, never while it is prepared or used.
BUILD_LOCK = threading.RLock()


def read_model_folder(folder: Path, dtype: torch.dtype, *, label: str, where: str, trust_remote_code: bool = False,
                      **kw: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a Hugging Face folder: checked first (:func:`check_model_folder`),
    then loaded from safetensors only (``use_safetensors=True``: transformers never falls back to a
    pickle). Failures caused by the folder's content become one-line GraftErrors naming ``where``
    (``label`` when the model needs custom code)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_folder(folder)
    try:
        with BUILD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kw
            )
    except GraftError:
        raise
    except (ValueError, OSError, KeyError, RuntimeError, TypeError, AttributeError, IndexError,
            NotImplementedError, SafetensorError) as exc:
        msg = _first_line(exc)
        if "trust_remote_code" in msg:
            raise GraftError(f"{label} needs custom code: turn on 'trust remote code' only if you trust it") from exc
        raise GraftError(f"cannot load {where}: {type(exc).__name__}: {msg}") from exc
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kw)
    except GraftError:
        raise
    except Exception as exc:  # the tokenizers library raises bare Exception for a malformed tokenizer.json
        msg = _first_line(exc)
        if "trust_remote_code" in msg:
            raise GraftError(f"{label} needs custom code: turn on 'trust remote code' only if you trust it") from exc
        raise GraftError(f"cannot load the tokenizer of {where}: {type(exc).__name__}: {msg}") from exc
    return model, tok


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
