"""T5 Concept cartography (docs/methods.md): where a concept lives, layer by layer and module by module.

Inputs (either):

* ``--adapter``: a PEFT LoRA folder, a ``make-donor`` folder or the demo donor's name. Per module
  ``dW = scale * B @ A`` exactly (``engine.adapters.lora_factors.adapter_deltas``). With ``--base`` as
  well, the adapter's shapes are checked against that model.
* ``--donor`` with ``--base``: a full fine-tune. ``dW = W_D - W_T`` per linear module, kept as a
  truncated randomized SVD of rank ``--rank`` (``engine.adapters.finetune_delta.finetune_deltas``) next to
  the exact ``||dW||_F``.

Cells (one per module): ``energy = ||dW||_F``; ``share = ||dW||_F^2 / sum ||dW||_F^2`` (squared
norms add up over modules; plain norms do not); ``top_sv`` the largest singular value;
``effective_rank = exp(H(p))`` with ``p_i = s_i^2 / sum s_j^2`` over the singular values that are
known (all of them for an adapter; the top ``--rank`` for a full fine-tune, where
``captured_share = sum s_i^2 / ||dW||_F^2`` says how much of the update they hold). Singular
values come from the factors (``engine.adapters.lowrank.factored_svd``), never from a dense product.

The grid is layers x module names (``attn.q`` ... ``mlp.down``) for each of the four metrics;
per-kind (attention / MLP), per-module-name and per-layer shares sum the cells' shares.
``--export DIR`` writes the concept map: ``concept_map.safetensors`` with, per cell, the top
``--top-k`` singular triplets ``<name>.U`` (out x k), ``<name>.S`` (k), ``<name>.Vh`` (k x in) so
that ``U diag(S) Vh`` is the best rank-k approximation of that cell's ``dW`` (out x in, LoRA scale
included), and ``concept_map.json``, the index (source, convention, every cell's numbers and
tensor names). An existing folder is replaced only when it is empty or is a concept map already.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..adapters.delta_map import NEEDS, CellStats, cell_stats, grid_axes, load_deltas
from ..adapters.lowrank import effective_rank, factored_svd
from ..core.errors import GraftError
from ..core.jsonsafe import finite_or_none
from ..core.params import param
from ..core.progress import Progress
from ..running.registry import Tool, register

CONCEPT_MAP_FORMAT = "graft-concept-map/1"
CONCEPT_MAP_INDEX = "concept_map.json"
CONCEPT_MAP_TENSORS = "concept_map.safetensors"
METRICS = ("energy", "share", "top_sv", "effective_rank")


@dataclass(frozen=True)
class CartographyParams:
    rank: int = param(
        16,
        "Full fine-tune (--donor with --base) only: rank of the truncated randomized SVD kept per "
        "module (the exact ||dW||_F is always computed). Adapters keep their own rank.",
        min=1,
        max=4096,
    )
    top_k: int = param(4, "Singular triplets per cell written by --export.", min=1, max=4096)
    export: str = param(
        "",
        "Write the concept map into this folder: concept_map.safetensors (top-k singular triplets "
        "U, S, Vh per cell) and concept_map.json (index). Empty = don't export.",
        path="out_dir",
    )
    seed: int = param(
        0, "Full fine-tune only: seed of the randomized SVD's Gaussian test matrices.", min=0, max=2**31 - 1
    )


@dataclass
class CartographyResult:
    source: dict[str, Any]  # kind "adapter" (path, config) or "finetune" (donor, base, rank)
    metrics: list[str]  # the cell metrics, as keys of grid
    cells: list[
        dict[str, Any]
    ]  # one per module: layer, module, kind, energy, share, top_sv, effective_rank, rank ...
    ranking: list[str]  # module names by energy, largest first
    layers: list[int]  # grid rows (block indices)
    modules: list[str]  # grid columns (module names)
    grid: dict[str, list[list[Optional[float]]]]  # metric -> layers x modules (None where no module)
    kind_shares: dict[str, Optional[float]]  # attention / mlp (/ other): share of the total squared energy
    module_shares: dict[str, Optional[float]]  # per module name (column sums)
    layer_shares: list[Optional[float]]  # per grid row (row sums), aligned with layers
    totals: dict[str, Any]
    export: Optional[dict[str, Any]]
    warnings: list[str]


def _check_export_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise GraftError(f"--export: {out} exists and is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / CONCEPT_MAP_INDEX).is_file():
        raise GraftError(
            f"--export: refusing to write into {out}: the folder is not empty and is not a concept map "
            f"(no {CONCEPT_MAP_INDEX})"
        )


def write_concept_map(
    out_dir: str,
    stats: list[CellStats],
    cells: list[dict[str, Any]],
    source: dict[str, Any],
    top_k: int,
    totals: dict[str, Any],
) -> dict[str, Any]:
    """Write ``concept_map.safetensors`` + ``concept_map.json`` (see the module docstring) through a
    registered staging folder, replacing ``out_dir`` only once both are complete."""
    from safetensors.torch import save_file

    from ..core.paths import discard_staging, replace_dir, staging_dir

    out = Path(out_dir).expanduser().resolve()
    _check_export_dir(out)
    tensors: dict[str, torch.Tensor] = {}
    index_cells = []
    for st, cell in zip(stats, cells):
        d = st.delta
        U, S, Vh = factored_svd(d.B, d.A)
        k = min(int(top_k), int(S.numel()))
        keys = {"U": f"{d.name}.U", "S": f"{d.name}.S", "Vh": f"{d.name}.Vh"}
        tensors[keys["U"]] = U[:, :k].to(torch.float32).contiguous()
        tensors[keys["S"]] = S[:k].to(torch.float32).contiguous()
        tensors[keys["Vh"]] = Vh[:k].to(torch.float32).contiguous()
        kept = float((S[:k] ** 2).sum())
        index_cells.append(
            {
                **cell,
                "k": k,
                "tensors": keys,
                "k_energy_share": finite_or_none(kept / st.norm_sq) if st.norm_sq > 0 else None,
            }
        )
    index = {
        "format": CONCEPT_MAP_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tensors_file": CONCEPT_MAP_TENSORS,
        "convention": "per cell, dW_k = U @ diag(S) @ Vh is the best rank-k approximation of the module's "
        "weight "
        "update, (out, in) as nn.Linear.weight (GPT-2 Conv1D weights are stored transposed), LoRA scale "
        "included; U (out x k), S (k, descending), Vh (k x in), float32",
        "top_k": int(top_k),
        "source": source,
        "totals": totals,
        "cells": index_cells,
    }
    text = json.dumps(index, indent=2, allow_nan=False)
    tmp = staging_dir(out)
    try:
        save_file(
            tensors,
            str(tmp / CONCEPT_MAP_TENSORS),
            metadata={"format": CONCEPT_MAP_FORMAT, "index": CONCEPT_MAP_INDEX},
        )
        (tmp / CONCEPT_MAP_INDEX).write_text(text, encoding="utf-8")
        _check_export_dir(out)  # again: the folder may have changed while we wrote
        replace_dir(tmp, out)
    finally:
        discard_staging(tmp)  # no-op once replace_dir moved it into place
    return {
        "path": str(out),
        "files": [CONCEPT_MAP_TENSORS, CONCEPT_MAP_INDEX],
        "top_k": int(top_k),
        "n_cells": len(index_cells),
        "n_tensors": len(tensors),
    }


def compute_cartography(ctx: Any, params: CartographyParams, progress: Progress) -> CartographyResult:
    src = load_deltas(ctx, params.rank, params.seed, progress.sub(0.0, 0.75))
    deltas = src.deltas
    if not deltas:
        raise GraftError("no module to map")
    stats = cell_stats(deltas, progress.sub(0.75, 0.9))
    warnings = list(src.warnings)
    total_sq = sum(s.norm_sq for s in stats)
    if total_sq <= 0:
        warnings.append(
            "the update is zero in every module (an untrained adapter: PEFT initialises B = 0; or "
            "identical "
            "donor and base): shares are undefined"
        )

    cells = []
    for st in stats:
        d = st.delta
        share = st.norm_sq / total_sq if total_sq > 0 else None
        cells.append(
            {
                "name": d.name,
                "layer": d.layer,
                "module": d.module,
                "kind": d.kind,
                "energy": finite_or_none(math.sqrt(st.norm_sq)),
                "share": finite_or_none(share),
                "top_sv": finite_or_none(st.S[0]) if st.S.numel() else 0.0,
                "effective_rank": finite_or_none(effective_rank(st.S)),
                "rank": d.rank,
                "shape": list(d.shape),
                "captured_share": finite_or_none(st.captured),
                "known": d.known,
            }
        )
    ranking = [c["name"] for c in sorted(cells, key=lambda c: (-(c["energy"] or 0.0), c["name"]))]

    layers, modules = grid_axes(deltas)
    li = {l: i for i, l in enumerate(layers)}
    mi = {m: j for j, m in enumerate(modules)}
    grid = {m: [[None] * len(modules) for _ in layers] for m in METRICS}
    for c in cells:
        if c["layer"] >= 0:
            for m in METRICS:
                grid[m][li[c["layer"]]][mi[c["module"]]] = c[m]

    def share_sum(pred: Callable[[dict], bool]) -> Optional[float]:
        if total_sq <= 0:
            return None
        return finite_or_none(sum(c["share"] or 0.0 for c in cells if pred(c)))

    kinds = sorted(
        {c["kind"] for c in cells},
        key=lambda k: ("attention", "mlp", "other").index(k) if k in ("attention", "mlp", "other") else 3,
    )
    kind_shares = {k: share_sum(lambda c, k=k: c["kind"] == k) for k in kinds}
    module_shares = {m: share_sum(lambda c, m=m: c["module"] == m and c["layer"] >= 0) for m in modules}
    layer_shares = [share_sum(lambda c, l=l: c["layer"] == l) for l in layers]
    caps = [s.captured for s in stats if s.captured is not None]
    known_sq = sum(float((s.S * s.S).sum()) for s in stats)
    top = ranking[0] if ranking else None
    best_layer = None
    if layers and total_sq > 0:
        best_layer = layers[max(range(len(layers)), key=lambda i: (layer_shares[i] or 0.0, -i))]
    totals = {
        "energy": finite_or_none(math.sqrt(total_sq)),
        "energy_sq": finite_or_none(total_sq),
        "n_modules": len(cells),
        "n_layers": len(layers),
        "n_attention": sum(c["kind"] == "attention" for c in cells),
        "n_mlp": sum(c["kind"] == "mlp" for c in cells),
        "n_other": sum(c["kind"] not in ("attention", "mlp") for c in cells),
        "max_rank": max(d.rank for d in deltas),
        "captured_share": finite_or_none(known_sq / total_sq) if total_sq > 0 else None,
        "min_captured_share": finite_or_none(min(caps)) if caps else None,
        "top_module": top,
        "top_layer": best_layer,
        "top10_share": share_sum(lambda c: c["name"] in set(ranking[:10])),
    }
    if src.truncated and caps and min(caps) < 0.9:
        low = sum(c < 0.9 for c in caps)
        warnings.append(
            f"{low} module(s) keep less than 90% of their ||dW||_F^2 in the top {params.rank} singular "
            f"directions (lowest {min(caps):.1%}): top_sv and shares are exact, the effective rank counts "
            "only those directions; raise --rank to see more of the spectrum"
        )

    export = None
    if params.export.strip():
        progress(0.92, f"writing the concept map to {params.export}")
        export = write_concept_map(params.export, stats, cells, src.source, params.top_k, totals)
    progress(1.0, "concept map ready")
    return CartographyResult(
        source=src.source,
        metrics=list(METRICS),
        cells=cells,
        ranking=ranking,
        layers=layers,
        modules=modules,
        grid=grid,
        kind_shares=kind_shares,
        module_shares=module_shares,
        layer_shares=layer_shares,
        totals=totals,
        export=export,
        warnings=warnings,
    )


TOOL = register(
    Tool(
        needs=NEEDS,
        uses_workload=False,
        name="cartography",
        code="T5",
        title="Concept cartography",
        summary="Where a concept lives: the energy of a LoRA adapter's (or a full fine-tune's) weight "
        "update per layer "
        "and module, with top singular value, effective rank, and an exportable concept map.",
        params_cls=CartographyParams,
        compute=compute_cartography,
        figure="viz.concept:cartography_figure",
        page="Concept",
        streams=True,  # a full fine-tune's dW reads two weights at a time (stream_forward.held)
    )
)
