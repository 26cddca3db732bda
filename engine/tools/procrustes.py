"""T3 Per-layer Procrustes residuals (docs/methods.md).

For each matched layer pair (i, j): centre and scale both row matrices to unit Frobenius norm
(statistics from the fit rows, applied unchanged to the held-out rows so nothing leaks), split
rows into fit / held-out (whole texts held out when there are at least 4), fit the
(semi-)orthogonal map R = U V^T from the SVD of X^T Y, and report the normalised residual
||X R - Y||_F^2 / ||Y||_F^2 on both parts. Baselines: unconstrained ridge least squares (how far a
linear bridge could go) and the identity map where widths are equal. Alignment = 1 - held-out
residual.

Underdetermined fits. When the rank of X^T Y on the fit rows is below min(dx, dy) (for instance
fewer centred fit rows than the width: n_fit - 1 < width), many orthogonal maps fit equally well
and they differ exactly on the directions the fit rows do not span, which is where held-out rows
have energy. The held-out residual would then depend on which completion the SVD routine happens
to return. ``engine.measure.linalg.procrustes_fit`` makes the map unique instead (numerical rank with the
relative tolerance ``PROCRUSTES_RTOL`` on the singular values):

* equal widths: the exact minimiser closest to the identity (a model against itself gives R = I,
  held-out residual 0, at any workload size);
* unequal widths: the partial isometry U_r V_r^T within the span the fit rows determine; held-out
  directions off that span map to 0 and count as unexplained.

Each layer reports ``rank`` and ``underdetermined``; the result reports ``rows_per_width``
(n_fit / the larger width), ``completion`` and one-line ``warnings``.

Cost: on CUDA every layer's map comes from one batch of Newton polar factors (:mod:`engine.measure.polar`);
on a CPU from one SVD per layer, the layers side by side when there are several threads
(:mod:`engine.core.threads`: a LAPACK SVD of this size gains little from threads of its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.errors import GraftError
from ..core.params import HeldOutFit, param
from ..core.progress import Progress
from ..core.threads import cpu_workers, parallel_map
from ..measure.linalg import (
    COMPLETION_IDENTITY,
    COMPLETION_SPAN,
    COMPLETION_UNIQUE,
    ieee_float32,
    monotone_matching,
    split_rows,
)
from ..measure.polar import cross_fits
from ..measure.procrustes_pair import finish_pair, fit_pair, prepare_pair
from ..measure.subspace import (
    COMPLETION_NONE,
    ESTIMATOR_SUBSPACE,
)
from ..running.context import ToolContext, device_rows
from ..running.registry import Tool, register


@dataclass(frozen=True)
class ProcrustesParams(HeldOutFit):
    pairs: str = param(
        "matching",
        "Which layer pairs to fit: 'matching' = T2's monotone CKA matching; 'depth' = equal relative depth.",
        choices=("matching", "depth"),
    )


@dataclass
class ProcrustesResult:
    layers: list[dict[str, Any]]
    mean_alignment: float
    pairs: str
    n_fit: int
    n_heldout: int
    alignment: str
    donor_width: int
    target_width: int
    # n_fit / max(donor_width, target_width): below 1 the fit rows cannot span the wider side
    # (with equal widths this always leaves the map underdetermined, since centring costs a row).
    rows_per_width: float
    # How the maps were made unique: "unique" (no layer underdetermined), "closest to identity"
    # (equal widths) or "within fit span" (unequal widths) for the underdetermined layers.
    completion: str
    # One-line human warnings (CLI and UI show them); empty when the fit is well determined.
    warnings: list[str]
    # "full", or "principal subspace" when some layer is underdetermined (see ProcrustesLayer)
    estimator: str = "full"
    # fit rows a unique full-space map needs (more than the wider width), and the workload tokens
    # that gives at this held-out fraction and rows-per-token ratio
    rows_needed: int = 0
    tokens_needed: int = 0


def use_newton(dev: torch.device) -> bool:
    """T3's maps from batched Newton polar factors (:mod:`engine.measure.polar`) on CUDA, where they are fast;
    per-layer SVDs on a CPU, where they are faster."""
    return dev.type == "cuda"


def depth_pairs(Ld: int, Lt: int) -> list[tuple[int, int]]:
    return [(i, round(i * (Lt - 1) / max(Ld - 1, 1))) for i in range(Ld)]


def compute_procrustes(ctx: ToolContext, params: ProcrustesParams, progress: Progress) -> ProcrustesResult:
    lean = getattr(ctx, "lean", None)
    if callable(lean) and lean():  # --stats streamed: pair by pair, both models walked in step
        layers, mode, fit, held, dx, dy = _lean_layers(ctx, params, progress)
    else:
        layers, mode, fit, held, dx, dy = _rows_layers(ctx, params, progress)
    progress(1.0, "done")
    rows = int(fit.numel())
    n_fit = int(fit.sum())
    completion = COMPLETION_UNIQUE
    if any(l["underdetermined"] for l in layers):
        completion = COMPLETION_IDENTITY if dx == dy else COMPLETION_SPAN
        if all(l["residual_heldout_completed"] is None for l in layers if l["underdetermined"]):
            completion = COMPLETION_NONE
    need = max(dx, dy) + 2  # centring costs a row: n_fit - 1 >= width
    meta = getattr(ctx, "meta", None) or {}
    n_tok = int(meta.get("n_tokens_target") or rows)
    tokens_needed = int(need / max(1e-9, 1 - params.heldout_fraction) * n_tok / max(rows, 1)) + 1
    return ProcrustesResult(
        layers=layers,
        mean_alignment=round(sum(l["alignment"] for l in layers) / len(layers), 6),
        pairs=params.pairs,
        n_fit=n_fit,
        n_heldout=int(held.sum()),
        alignment=mode,
        donor_width=dx,
        target_width=dy,
        rows_per_width=round(n_fit / max(dx, dy), 6),
        completion=completion,
        warnings=procrustes_warnings(layers, n_fit, dx, dy, tokens_needed, meta.get("memory_plan")),
        estimator=ESTIMATOR_SUBSPACE if any(l["estimator"] != "full" for l in layers) else "full",
        rows_needed=need,
        tokens_needed=tokens_needed,
    )


def _rows_layers(ctx: ToolContext, params: ProcrustesParams, progress: Progress):
    """T3 from every layer's captured rows (the rows route)."""
    al = ctx.aligned(progress.sub(0, 0.6))
    Ld, Lt = al.X.shape[0] - 1, al.Y.shape[0] - 1
    if params.pairs == "matching":
        pairs = monotone_matching(ctx.cka(progress.sub(0.6, 0.75), include_embeddings=False))
    else:
        pairs = depth_pairs(Ld, Lt)
    fit, held = split_rows(al.group, params.heldout_fraction, params.seed)
    if int(fit.sum()) < 2 or int(held.sum()) < 1:
        raise GraftError("too few aligned rows to hold some out: use a larger workload or --max-tokens")
    al, dev = device_rows(ctx, al)
    fit_d, held_d = fit.nonzero().squeeze(1).to(dev), held.nonzero().squeeze(1).to(dev)  # row indices
    with ieee_float32(dev):
        if use_newton(dev):  # all layers' cross-products first, then one batch of polar factors
            preps = []
            for k, (i, j) in enumerate(pairs):
                progress(0.75 + 0.2 * k / len(pairs), f"Procrustes layer {i} -> {j}")
                preps.append(
                    prepare_pair(
                        al.X[i + 1].to(dev), al.Y[j + 1].to(dev), fit_d, held_d, params.ridge_alpha, i, j
                    )
                )
            progress(0.95, "Procrustes maps")
            todo = [p for p in preps if p.pf is None]
            for p, pf in zip(todo, cross_fits([p.M for p in todo], newton=True)):
                p.pf = pf
            layers = [finish_pair(p).__dict__ for p in preps]
        else:  # layer by layer (side by side on several CPU threads): a layer's rows held per worker

            def one(pair: tuple[int, int]) -> dict[str, Any]:
                i, j = pair
                return fit_pair(
                    al.X[i + 1].to(dev), al.Y[j + 1].to(dev), fit_d, held_d, params.ridge_alpha, i, j
                ).__dict__

            dx, dy = int(al.X.shape[2]), int(al.Y.shape[2])
            n = int(al.X.shape[1])  # a layer's float64 rows, standardised copies and d x d factors per worker
            workers = cpu_workers(
                dev,
                len(pairs),
                2.0 * float(fit.sum()) * dx * (dx + dy) + 20.0 * max(dx, dy) ** 3,  # X^T [X Y], SVD
                16.0 * (n * (dx + dy) + 4 * max(dx, dy) ** 2),
            )
            layers = parallel_map(
                one,
                pairs,
                progress.sub(0.75, 1.0),
                lambda ij: f"Procrustes layer {ij[0]} -> {ij[1]}",
                workers,
            )
    return layers, al.mode, fit, held, int(al.X.shape[2]), int(al.Y.shape[2])


def _lean_layers(ctx: ToolContext, params: ProcrustesParams, progress: Progress):
    """T3 on the lean route (engine/running/lean_stats.py): the same fit per pair, from the rows of
    one donor layer and one target layer while both models are walked in step."""
    from ..running.lean_stats import lockstep_pairs

    ls = ctx.lean_stats(progress.sub(0, 0.45))
    if params.pairs == "matching":
        pairs = monotone_matching(ctx.cka(progress.sub(0.45, 0.5), include_embeddings=False))
    else:
        pairs = depth_pairs(ctx.donor.arch.n_layers, ctx.target.arch.n_layers)
    fit, held = split_rows(ls.ra.group, params.heldout_fraction, params.seed)
    if int(fit.sum()) < 2 or int(held.sum()) < 1:
        raise GraftError("too few aligned rows to hold some out: use a larger workload or --max-tokens")
    fit_i, held_i = fit.nonzero().squeeze(1), held.nonzero().squeeze(1)
    with ieee_float32(torch.device("cpu")):
        layers = lockstep_pairs(
            ctx.donor,
            ctx.target,
            ctx.texts(),
            ls.ra,
            pairs,
            lambda i, j, X, Y: fit_pair(X, Y, fit_i, held_i, params.ridge_alpha, i, j).__dict__,
            batch_size=ctx.options.batch_size,
            progress=progress.sub(0.5, 1.0),
        )
    return layers, ls.ra.mode, fit, held, ls.dx, ls.dy


def _widths(dx: int, dy: int) -> str:
    return f"width {dx}" if dx == dy else f"widths {dx} → {dy}"


def procrustes_warnings(
    layers: list[dict[str, Any]],
    n_fit: int,
    dx: int,
    dy: int,
    tokens_needed: int = 0,
    plan: Optional[dict[str, Any]] = None,
) -> list[str]:
    """One-line warnings about how well the fit rows determine the maps.

    * underdetermined layers (rank of X^T Y below min(dx, dy)): e.g. "T3 fit is underdetermined in
      30/30 layers: 433 fit rows against width 576 (rank 427 of 576); the map is completed closest
      to identity off the rows' span — use a larger workload or --max-tokens for a fully
      determined fit";
    * otherwise, fewer fit rows than the larger width (only possible with unequal widths): the map
      is unique but fitted on about as many rows as dimensions, so the held-out residual is
      inflated by overfitting.
    """
    out: list[str] = []
    under = [l for l in layers if l.get("underdetermined")]
    full = min(dx, dy)
    if under:
        lo, hi = min(l["rank"] for l in under), max(l["rank"] for l in under)
        ranks = f"rank {lo}" if lo == hi else f"rank {lo}-{hi}"
        sub = [l for l in under if l.get("estimator") == ESTIMATOR_SUBSPACE]
        if sub:
            r = sub[0].get("subspace_rank")
            energy = [
                l["heldout_energy_in_subspace"]
                for l in sub
                if l.get("heldout_energy_in_subspace") is not None
            ]
            how = (
                f"alignment is measured in each side's top {r} principal directions of its fit rows "
                f"(they hold {100 * min(energy):.0f}-{100 * max(energy):.0f}% of the held-out energy), "
                "not in the whole space"
            )
        else:
            how = "the map is completed " + (
                "closest to identity off the rows' span"
                if dx == dy
                else "within the fit span (directions off it count as unexplained)"
            )
        cost = ""
        if tokens_needed:
            cost = f" — a determined fit needs about {tokens_needed:,} tokens (--max-tokens)"
            if plan and plan.get("t3_needed_peak_bytes"):
                gib = plan["t3_needed_peak_bytes"] / 1024**3
                # the time estimate is measured on this machine: it stays in meta.memory_plan, so the
                # result itself is the same from run to run
                cost += f", about {gib:.1f} GiB peak (meta.memory_plan gives the time)"
        out.append(
            f"T3 fit is underdetermined in {len(under)}/{len(layers)} layers: {n_fit} fit rows against "
            f"{_widths(dx, dy)} ({ranks} of {full}); {how}{cost}"
        )
    elif n_fit < max(dx, dy):
        out.append(
            f"T3 fit rows ({n_fit}) are fewer than the larger width ({_widths(dx, dy)}, "
            f"{n_fit / max(dx, dy):.2f} rows per width): the map is unique but barely constrained, so "
            f"held-out residuals are inflated by overfitting — use a larger workload or --max-tokens"
        )
    return out


TOOL = register(
    Tool(
        name="procrustes",
        code="T3",
        title="Per-layer Procrustes residuals",
        summary="Orthogonal map per matched layer pair: residual on fit vs held-out rows, with ridge and "
        "identity baselines.",
        params_cls=ProcrustesParams,
        compute=compute_procrustes,
        figure="viz.alignment:procrustes_figure",
        page="Alignment",
        streams=True,
        dispatches=True,
        lean=True,
    )
)
