"""What a model weighs, for the memory plan (:mod:`engine.running.memplan`): sizes from its
safetensors headers and config.json, built on the meta device, with no weight read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import torch

from ..core.errors import GraftError


@dataclass
class Footprint:
    """What one model weighs, from its headers and config (nothing read)."""

    label: str
    folder: Optional[str]  # None: built in memory (a tiny model), cannot stream
    file_bytes: int  # its backbone's weights as stored
    run_bytes: int  # the whole model in the run's dtype
    outside_bytes: int  # embeddings, position tables, final norm, in the run's dtype
    block_bytes: int  # its largest block, in the run's dtype
    n_layers: int
    width: int
    backbone_params: int
    intermediate: int
    module_width: int = 0  # summed output width of every linear module in the blocks (T7's rows)


@lru_cache(maxsize=32)
def _footprint(ref: str, kind: str, trust: bool, dtype: str, stamp: float) -> Footprint:
    from ..loading.arch import ArchAdapter
    from ..loading.modelfiles import check_model_folder
    from ..loading.models import ModelSpec, model_folder, resolve_dtype
    from ..loading.stream import attach_stream, skeleton
    from ..loading.tiny import TINY_MODELS, build_tiny

    spec = ModelSpec(kind, ref, trust)
    dt = resolve_dtype(dtype)
    size = torch.empty(0, dtype=dt).element_size()
    if kind == "builtin" and ref in TINY_MODELS:
        model, _ = build_tiny(ref)
        arch = ArchAdapter(model)
        n = sum(p.numel() for p in model.parameters())
        blk = max(sum(p.numel() for p in b.parameters()) for b in arch.blocks)
        desc = arch.describe()
        return Footprint(
            spec.label, None, n * 4, n * size, (n - blk * arch.n_layers) * size, blk * size,
            arch.n_layers, arch.hidden_size, n, int(desc.get("intermediate_size") or 4 * arch.hidden_size),
        )  # fmt: skip
    folder = model_folder(spec)
    if folder is None:
        raise GraftError(f"hub model {ref} is not in the local Hugging Face cache and Graft never downloads")
    check_model_folder(Path(folder))  # headers and config.json checked before anything is built from them
    try:  # never with the model's own code: planning must not run it
        model = skeleton(Path(folder), torch.device("cpu"), dt, False)
    except GraftError:
        if not trust:
            raise
        return _headers_only(spec.label, Path(folder), size)
    arch = ArchAdapter(model)
    st = attach_stream(model, Path(folder), arch.blocks_path, arch.n_layers, torch.device("cpu"), dt)
    params = dict(model.named_parameters(remove_duplicate=False))
    numel = {n: params[n].numel() for n in st.keys}
    blocks = [sum(numel[n] for n in st.block_params(l)) for l in range(arch.n_layers)]
    outside = sum(numel[n] for n in st.outside_params())
    backbone = sum(numel.values())
    n_all = sum(p.numel() for p in model.parameters())
    desc = arch.describe()
    module_width = sum(int(m.shape[0]) for m in arch.linear_modules() if m.layer >= 0)
    return Footprint(
        spec.label,
        str(folder),
        sum(st.index.entries[k].nbytes for k in st.keys.values()),
        n_all * size,
        outside * size,
        max(blocks) * size,
        arch.n_layers,
        arch.hidden_size,
        backbone,
        int(desc.get("intermediate_size") or 4 * arch.hidden_size),
        module_width,
    )


def _headers_only(label: str, folder: Path, size: int) -> Footprint:
    """A model that needs its own code to be built: sized from its headers and config.json alone,
    held whole (it cannot stream: its blocks are not known without its code)."""
    from ..core.jsonio import read_json_file
    from ..loading.stream import DTYPE_BYTES, WeightIndex

    index = WeightIndex(folder)
    numel = sum(e.nbytes // DTYPE_BYTES.get(e.dtype, 4) for e in index.entries.values())
    cfg = read_json_file(folder / "config.json")
    cfg = cfg if isinstance(cfg, dict) else {}
    width = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0)
    inter = int(cfg.get("intermediate_size") or 4 * width)
    return Footprint(
        label, None, index.total_bytes, numel * size, numel * size, 0, layers, width, numel, inter
    )


def footprint(spec: Any, dtype: str) -> Footprint:
    """The :class:`Footprint` of a model spec (cached per folder and modification time)."""
    from ..loading.models import model_folder

    stamp = 0.0
    if spec.kind == "path":
        try:
            stamp = os.stat(spec.ref).st_mtime
        except OSError:
            stamp = 0.0
    elif spec.kind == "builtin":
        try:
            folder = model_folder(spec)
            stamp = os.stat(folder).st_mtime if folder is not None else 0.0
        except GraftError:
            raise
    return _footprint(spec.ref, spec.kind, spec.trust_remote_code, dtype, stamp)
