"""T3 Per-layer Procrustes residuals (METHODS.md).

For each matched layer pair (i, j): centre and scale both row matrices to unit Frobenius norm
(statistics from the fit rows, applied unchanged to the held-out rows so nothing leaks), split
rows into fit / held-out (whole texts held out when there are at least 4), fit the
(semi-)orthogonal map R = U V^T from the SVD of X^T Y, and report the normalised residual
||X R - Y||_F^2 / ||Y||_F^2 on both parts. Baselines: unconstrained ridge least squares (how far a
linear bridge could go) and the identity map where widths are equal. Alignment = 1 - held-out
residual.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..context import ToolContext
from ..errors import GraftError
from ..linalg import Standardiser, monotone_matching, procrustes_map, residual, ridge_map, split_rows
from ..params import param
from ..progress import Progress
from ..registry import Tool, register


@dataclass(frozen=True)
class ProcrustesParams:
    pairs: str = param("matching", "Which layer pairs to fit: 'matching' = T2's monotone CKA matching; 'depth' = equal relative depth.", choices=("matching", "depth"))
    heldout_fraction: float = param(0.25, "Share of texts (or rows, with fewer than 4 texts) held out to test each map.", min=0.05, max=0.9)
    ridge_alpha: float = param(0.01, "Ridge strength, relative to the mean eigenvalue of X^T X.", min=0.0)
    seed: int = param(0, "Seed of the fit / held-out split.", min=0)


@dataclass
class ProcrustesLayer:
    donor_layer: int
    target_layer: int
    residual_fit: float
    residual_heldout: float
    residual_ridge: float  # held-out
    residual_ridge_fit: float
    residual_identity: Optional[float]  # held-out; None when widths differ
    alignment: float  # 1 - residual_heldout


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


def depth_pairs(Ld: int, Lt: int) -> list[tuple[int, int]]:
    return [(i, round(i * (Lt - 1) / max(Ld - 1, 1))) for i in range(Ld)]


def compute_procrustes(ctx: ToolContext, params: ProcrustesParams, progress: Progress) -> ProcrustesResult:
    al = ctx.aligned(progress.sub(0, 0.6))
    Ld, Lt = al.X.shape[0] - 1, al.Y.shape[0] - 1
    if params.pairs == "matching":
        pairs = monotone_matching(ctx.cka(progress.sub(0.6, 0.75), include_embeddings=False))
    else:
        pairs = depth_pairs(Ld, Lt)
    fit, held = split_rows(al.group, params.heldout_fraction, params.seed)
    if int(fit.sum()) < 2 or int(held.sum()) < 1:
        raise GraftError("too few aligned rows to hold some out: use a larger workload or --max-tokens")
    layers = []
    for k, (i, j) in enumerate(pairs):
        progress(0.75 + 0.25 * k / len(pairs), f"Procrustes layer {i} -> {j}")
        X, Y = al.X[i + 1].double(), al.Y[j + 1].double()
        sx, sy = Standardiser.fit(X[fit]), Standardiser.fit(Y[fit])
        Xf, Xh, Yf, Yh = sx(X[fit]), sx(X[held]), sy(Y[fit]), sy(Y[held])
        R = procrustes_map(Xf, Yf)  # (dx, dy)
        W = ridge_map(Xf, Yf, params.ridge_alpha)
        ident = residual(Xh, Yh) if X.shape[1] == Y.shape[1] else None
        rh = residual(Xh @ R, Yh)
        layers.append(ProcrustesLayer(
            donor_layer=i, target_layer=j,
            residual_fit=round(residual(Xf @ R, Yf), 6),
            residual_heldout=round(rh, 6),
            residual_ridge=round(residual(Xh @ W, Yh), 6),
            residual_ridge_fit=round(residual(Xf @ W, Yf), 6),
            residual_identity=None if ident is None else round(ident, 6),
            alignment=round(1.0 - rh, 6),
        ).__dict__)
    progress(1.0, "done")
    return ProcrustesResult(
        layers=layers,
        mean_alignment=round(sum(l["alignment"] for l in layers) / len(layers), 6),
        pairs=params.pairs,
        n_fit=int(fit.sum()), n_heldout=int(held.sum()),
        alignment=al.mode,
        donor_width=int(al.X.shape[2]), target_width=int(al.Y.shape[2]),
    )


TOOL = register(Tool(
    name="procrustes", code="T3", title="Per-layer Procrustes residuals",
    summary="Orthogonal map per matched layer pair: residual on fit vs held-out rows, with ridge and identity baselines.",
    params_cls=ProcrustesParams, compute=compute_procrustes, figure="viz.alignment:procrustes_figure", page="Alignment",
))
