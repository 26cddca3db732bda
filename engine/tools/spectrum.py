"""T6 Spectrum and rank-k (docs/methods.md): how many directions each module's update needs.

Same inputs as T5 (``--adapter``, or ``--donor`` with ``--base``; see
:mod:`engine.tools.cartography`). Per module, the singular values of ``dW`` come from the
factors (``engine.adapters.lowrank.factored_svd``: QR of ``B`` and ``A^T``, SVD of the small core), never
from the dense product. ``energy_cumulative[k-1] = sum_{i<=k} s_i^2 / ||dW||_F^2`` and the
recommended ``k_at_threshold`` is the smallest ``k`` reaching ``--threshold`` (default 0.9).

For a full fine-tune the spectrum is the top ``--rank`` of a randomized SVD while the
denominator is the exact ``||dW||_F^2``: the curve may end below 1, and where it ends below the
threshold ``k_at_threshold`` is ``null`` (more than ``--rank`` directions are needed; the
module is counted in ``summary.n_undetermined``), never a made-up number.

Summary statistics (median, mean, max, per kind, per module name) are over modules whose
update is not zero and whose ``k`` is determined; ``max_k`` is the rank that reaches the
threshold in every such module at once.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Optional

from ..adapters.delta_map import NEEDS, cell_stats, check_filter_used, grid_axes, load_deltas, module_filter
from ..adapters.lowrank import cumulative_energy, effective_rank, k_at_energy
from ..core.errors import GraftError
from ..core.jsonsafe import finite_or_none
from ..core.params import param
from ..core.progress import Progress
from ..running.registry import Tool, register


@dataclass(frozen=True)
class SpectrumParams:
    threshold: float = param(
        0.9,
        "Energy threshold: recommended k = smallest rank whose cumulative share of ||dW||_F^2 reaches it.",
        min=1e-6,
        max=1.0,
    )
    rank: int = param(
        16,
        "Full fine-tune (--donor with --base) only: singular values computed per module "
        "(truncated randomized SVD). Adapters keep their own rank.",
        min=1,
        max=4096,
    )
    modules: str = param(
        "",
        "Only these modules, comma separated: names (blocks.3.attn.q), module names (attn.q), "
        "kinds (attention, mlp), layers (layer:3) or globs (blocks.1*.mlp.*). Empty = all.",
    )
    seed: int = param(
        0, "Full fine-tune only: seed of the randomized SVD's Gaussian test matrices.", min=0, max=2**31 - 1
    )


@dataclass
class SpectrumResult:
    source: dict[str, Any]
    threshold: float
    modules: list[
        dict[str, Any]
    ]  # name, layer, module, kind, singular_values, energy_cumulative, k_at_threshold ...
    summary: dict[str, Any]
    layers: list[int]  # rows of k_grid
    module_names: list[str]  # columns of k_grid
    k_grid: list[
        list[Optional[int]]
    ]  # recommended k per (layer, module name); None where absent or undetermined
    warnings: list[str]


def _median(xs: list[int]) -> Optional[float]:
    return float(statistics.median(xs)) if xs else None


def compute_spectrum(ctx: Any, params: SpectrumParams, progress: Progress) -> SpectrumResult:
    select = module_filter(params.modules)
    src = load_deltas(ctx, params.rank, params.seed, progress.sub(0.0, 0.8), select=select)
    if select is not None:
        check_filter_used(select, [d.name for d in src.deltas] or ["blocks.0.attn.q"])
    if not src.deltas:
        raise GraftError("no module to analyse")
    stats = cell_stats(src.deltas, progress.sub(0.8, 0.97))
    warnings = list(src.warnings)
    thr = float(params.threshold)
    rows = []
    for st in stats:
        d = st.delta
        total = st.norm_sq if src.truncated else None
        k = k_at_energy(st.S, thr, total=total)
        rows.append(
            {
                "name": d.name,
                "layer": d.layer,
                "module": d.module,
                "kind": d.kind,
                "rank": d.rank,
                "shape": list(d.shape),
                "energy": finite_or_none(st.norm_sq**0.5),
                "singular_values": [float(s) for s in st.S],
                "energy_cumulative": cumulative_energy(st.S, total=st.norm_sq if st.norm_sq > 0 else None),
                "k_at_threshold": k,
                "effective_rank": finite_or_none(effective_rank(st.S)),
                "captured_share": finite_or_none(st.captured),
            }
        )
    live = [r for r in rows if (r["energy"] or 0.0) > 0]
    ks = [r["k_at_threshold"] for r in live if r["k_at_threshold"] is not None]
    undetermined = [r["name"] for r in live if r["k_at_threshold"] is None]
    counts: dict[str, int] = {}
    for k in ks:
        counts[str(k)] = counts.get(str(k), 0) + 1
    by_kind = {
        kind: _median(
            [r["k_at_threshold"] for r in live if r["kind"] == kind and r["k_at_threshold"] is not None]
        )
        for kind in sorted({r["kind"] for r in rows})
    }
    layers, names = grid_axes(src.deltas)
    by_module = {
        m: _median(
            [
                r["k_at_threshold"]
                for r in live
                if r["module"] == m and r["layer"] >= 0 and r["k_at_threshold"] is not None
            ]
        )
        for m in names
    }
    summary = {
        "threshold": thr,
        "n_modules": len(rows),
        "n_zero": len(rows) - len(live),
        "n_determined": len(ks),
        "n_undetermined": len(undetermined),
        "undetermined": undetermined[:50],
        "median_k": _median(ks),
        "mean_k": finite_or_none(sum(ks) / len(ks)) if ks else None,
        "min_k": min(ks) if ks else None,
        "max_k": max(ks) if ks else None,
        "k_counts": dict(sorted(counts.items(), key=lambda kv: int(kv[0]))),
        "median_k_by_kind": by_kind,
        "median_k_by_module": by_module,
        "max_rank": max(r["rank"] for r in rows),
    }
    if undetermined:
        warnings.append(
            f"{len(undetermined)} module(s) do not reach {thr:g} of their energy within the top "
            f"{params.rank} "
            "singular directions computed: their k is undetermined (> rank); raise --rank"
        )
    if not live:
        warnings.append("the update is zero in every module: there is no spectrum to read")
    li = {l: i for i, l in enumerate(layers)}
    mi = {m: j for j, m in enumerate(names)}
    k_grid: list[list[Optional[int]]] = [[None] * len(names) for _ in layers]
    for r in rows:
        if r["layer"] >= 0:
            k_grid[li[r["layer"]]][mi[r["module"]]] = r["k_at_threshold"]
    progress(1.0, "spectra ready")
    return SpectrumResult(
        source=src.source,
        threshold=thr,
        modules=rows,
        summary=summary,
        layers=layers,
        module_names=names,
        k_grid=k_grid,
        warnings=warnings,
    )


TOOL = register(
    Tool(
        needs=NEEDS,
        uses_workload=False,
        name="spectrum",
        code="T6",
        title="Spectrum and rank-k",
        summary="Singular values of each module's weight update from its low-rank factors, cumulative "
        "energy curves, "
        "and the smallest rank k reaching an energy threshold per module.",
        params_cls=SpectrumParams,
        compute=compute_spectrum,
        figure="viz.concept:spectrum_figure",
        page="Concept",
        streams=True,  # a full fine-tune's dW reads two weights at a time (stream_forward.held)
    )
)
