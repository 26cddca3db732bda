"""The map of one side of one module, for the rank-k conjugation (:mod:`engine.surgery.conjugate`).

A module's update ``dW`` is carried from the base B into the target T by one map per side: the
input side ``X_B ~ X_T M_in`` on the module's inputs, the output side ``O_T ~ O_B M_out`` on its
outputs (rows aligned by :func:`engine.measure.align.row_alignment`). :func:`fit_side` fits the candidate
maps of one side and chooses one; :class:`SideMap` holds it.

Maps act on raw activations
---------------------------
The map is folded into a weight, and a bias-free weight can absorb a linear map but no offset, so
every candidate is fitted *and judged* on uncentred rows (T3 centres; here centring would fit a
map to data the folded weight never sees). Procrustes carries an isotropic scale: T3 compares
sides after scaling both to unit norm, so a side that is a scaled rotation counts as explained
there; here the scale must be in the map, ``M = s R`` with ``R`` from
:func:`engine.measure.linalg.procrustes_fit` (semi-orthogonal when widths differ; made unique when the fit
rows do not span the width) and ``s = <X R, Y> / ||X R||^2`` (least squares, clamped at 0).
Ridge is :func:`engine.measure.linalg.ridge_map` on the raw rows (``alpha`` relative to the mean
eigenvalue of ``X^T X``). Ridge shrinks towards zero, so a fixed ``alpha`` biases even an exact
linear relation by about ``alpha`` (T3's 0.01 costs a rotated twin ~2.5% of the update); by
default (``ridge_alpha = 0``) each side picks ``alpha`` from :data:`RIDGE_GRID` (1e-8 .. 1) on an
inner validation split of the *fit* rows (:func:`choose_ridge_alpha`), so the held-out rows stay
untouched by every choice but the map kind.

Choosing the map of a side
--------------------------
Rows are split into fit and held-out parts as in T3 (whole texts held out when there are at least
4; seed ``seed``). Every candidate is fitted on the fit rows and scored by the normalised
held-out residual ``r = ||X_h M - Y_h||_F^2 / ||Y_h||_F^2`` (1.0 when ``Y_h`` is all zeros):

1. **identity** (equal widths only) when ``r_identity <= identity_tol`` (default
   :data:`IDENTITY_TOL` = 1e-4, an rms error of 1% of the side: the spaces coincide up to the
   rounding of a 16-bit model) or when no fitted map does better on held-out rows
   (``r_identity <= min(r_procrustes, r_ridge)``: a fit that does not generalise is not used);
2. else **procrustes** when ``r_procrustes <= r_ridge + procrustes_tol`` (default
   :data:`PROCRUSTES_TOL` = 0.01: a rotation is preferred unless an unconstrained map explains
   at least 1% more of the side's energy; it cannot amplify directions the rows barely sample);
3. else **ridge**.

Procrustes is a candidate only where the fit rows determine the rotation (at least as many fit rows
as the smaller width). With fewer, its completion outside the rows' span is a choice, not a fit, and
costs an ``O(d^3)`` polar factor (minutes per side at width 4,096), so auto compares identity and
ridge alone and says why; ``force = procrustes`` still fits it.

When the identity is chosen by the first clause of rule 1 (or forced), the other candidates cannot
change the choice and are not fitted (their residuals are null) unless ``fit_all`` asks for them:
they cost an SVD and an eigendecomposition of a width x width matrix each, and the sides inside a
block (q/k/v/gate/up outputs, o/down inputs) are often exactly the identity. ``force`` overrides
the rule (``identity`` = plain merge, for ablations).
Each side reports the map, its held-out residual, every candidate's fit and held-out residuals,
the Procrustes scale, rank and whether it was underdetermined (rank of ``X^T Y`` below the
smaller width, e.g. fewer fit rows than the width).

Expected on a rotated twin (``h' = h Q``, norm gains ``g`` folded, :mod:`engine.surgery.twin`):
q/k/v/gate/up inputs ``X_B = X_T Q^T diag(g)`` (not a rotation: ridge), their outputs identical
(identity), o/down inputs identical (identity), o/down outputs ``O_T = O_B Q`` (procrustes, which
recovers ``Q``). A model against itself: every side identity and ``dW_T == dW`` exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..core.errors import GraftError
from ..core.jsonsafe import rnd
from ..measure.linalg import procrustes_fit, residual, ridge_map, split_rows

IDENTITY_TOL = 1e-4
"""Held-out residual at or below which the identity is used (the spaces coincide)."""
PROCRUSTES_TOL = 0.01
"""Procrustes is used while its held-out residual is within this of the ridge map's."""
MAP_KINDS = ("identity", "procrustes", "ridge")
FORCE_CHOICES = ("auto",) + MAP_KINDS
RIDGE_GRID = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""Relative ridge strengths tried when ``ridge_alpha`` is 0 (auto), see :func:`choose_ridge_alpha`."""
RIDGE_FALLBACK = 1e-2  # auto alpha when the fit rows are too few to split (T3's default)


@dataclass
class SideMap:
    """The map of one side of one module: ``X_dst ~ X_src @ matrix`` on the side's rows.

    Input side: ``X_src`` = target inputs, ``X_dst`` = base inputs (``M_in``, ``(in_T, in_B)``);
    output side: ``X_src`` = base outputs, ``X_dst`` = target outputs (``M_out``,
    ``(out_B, out_T)``). ``matrix`` is float64, ``None`` for the identity (or once dropped, see
    ``plan_conjugation(keep_maps=False)``; ``kind`` always says which map it was).
    """

    kind: str  # "identity" | "procrustes" | "ridge"
    matrix: Optional[torch.Tensor]  # (d_src, d_dst) float64; None = identity / dropped
    heldout_residual: float  # of the chosen map
    fit_residual: float
    residuals: dict[
        str, Optional[float]
    ]  # held-out residual per candidate; None = not applicable / not fitted
    fit_residuals: dict[str, Optional[float]]
    scale: Optional[float]  # Procrustes isotropic scale s (M = s R)
    ridge_alpha: Optional[
        float
    ]  # the ridge candidate's relative strength (chosen on an inner split when auto)
    rank: Optional[int]  # numerical rank of X^T Y on the fit rows (Procrustes)
    underdetermined: (
        bool  # rank < min(d_src, d_dst): the orthogonal part was completed (engine.measure.linalg)
    )
    d_src: int
    d_dst: int
    n_fit: int
    n_heldout: int
    reason: str  # why this map

    def apply_right(self, X: torch.Tensor) -> torch.Tensor:
        """``X @ M`` (identity: ``X``)."""
        if self.kind == "identity":
            return X
        if self.matrix is None:
            raise GraftError("internal: the map's matrix was dropped (plan_conjugation(keep_maps=False))")
        return (X.double() @ self.matrix).to(X.dtype)

    def report(self) -> dict[str, Any]:
        return {
            "map": self.kind,
            "heldout_residual": rnd(self.heldout_residual, 8),
            "fit_residual": rnd(self.fit_residual, 8),
            "residuals": {k: rnd(v, 8) for k, v in self.residuals.items()},
            "fit_residuals": {k: rnd(v, 8) for k, v in self.fit_residuals.items()},
            "scale": rnd(self.scale, 8),
            "ridge_alpha": self.ridge_alpha,
            "rank": self.rank,
            "underdetermined": bool(self.underdetermined),
            "width_from": self.d_src,
            "width_to": self.d_dst,
            "n_fit": self.n_fit,
            "n_heldout": self.n_heldout,
            "reason": self.reason,
        }


def _res(pred: torch.Tensor, Y: torch.Tensor) -> float:
    """Normalised residual; 1.0 (nothing explained) when ``Y`` is all zeros."""
    r = residual(pred, Y)
    return r if math.isfinite(r) else 1.0


def choose_ridge_alpha(
    X: torch.Tensor,
    Y: torch.Tensor,
    group: Optional[torch.Tensor],
    seed: int = 0,
    grid: Sequence[float] = RIDGE_GRID,
) -> float:
    """The ridge strength (relative, as :func:`engine.measure.linalg.ridge_map`) with the lowest residual on
    an inner validation split of the fit rows (a quarter of their texts, or of the rows with fewer
    than 4 texts; seed ``seed + 1``); the held-out rows never take part. One eigendecomposition of
    ``X^T X`` serves the whole grid. X: (n_fit, dx), Y: (n_fit, dy), float64."""
    if group is None:
        group = torch.arange(X.shape[0])
    inner, val = split_rows(group, 0.25, seed + 1)
    if int(inner.sum()) < 1 or int(val.sum()) < 1:
        return RIDGE_FALLBACK
    Xi, Yi, Xv, Yv = X[inner], Y[inner], X[val], Y[val]
    G = Xi.T @ Xi
    e, V = torch.linalg.eigh(G)  # G = V diag(e) V^T
    C = V.T @ (Xi.T @ Yi)  # (dx, dy)
    XvV = Xv @ V
    mean_eig = float(torch.trace(G)) / G.shape[0]
    best, best_r = RIDGE_FALLBACK, math.inf
    for a in grid:
        lam = a * mean_eig
        r = _res(XvV @ (C / (e.clamp_min(0) + lam).unsqueeze(1)), Yv)
        if r < best_r - 1e-15:
            best, best_r = float(a), r
    return best


def fit_side(
    X_src: torch.Tensor,
    X_dst: torch.Tensor,
    fit: torch.Tensor,
    heldout: torch.Tensor,
    *,
    ridge_alpha: float = 0.0,
    identity_tol: float = IDENTITY_TOL,
    procrustes_tol: float = PROCRUSTES_TOL,
    force: str = "auto",
    group: Optional[torch.Tensor] = None,
    seed: int = 0,
    fit_all: bool = False,
) -> SideMap:
    """Fit ``X_dst ~ X_src M`` on the ``fit`` rows and choose the map by the rules of the module
    docstring, judged on the ``heldout`` rows. X_src: (n, d_src), X_dst: (n, d_dst), raw
    (uncentred) rows; fit / heldout: boolean (n,); group: (n,) text of each row (for the inner
    split that picks the ridge strength when ``ridge_alpha`` is 0); ``fit_all``: fit every candidate
    even where the choice does not need them. Computed in float64."""
    if force not in FORCE_CHOICES:
        raise GraftError(f"map must be one of {', '.join(FORCE_CHOICES)}, got {force!r}")
    X, Y = X_src.double(), X_dst.double()
    Xf, Yf, Xh, Yh = X[fit], Y[fit], X[heldout], Y[heldout]
    d_src, d_dst = int(X.shape[1]), int(Y.shape[1])
    n_fit, n_ho = int(fit.sum()), int(heldout.sum())
    if n_fit < 1 or n_ho < 1:
        raise GraftError("too few aligned rows to fit and test a map: use a larger workload or --max-tokens")
    same_width = d_src == d_dst
    held: dict[str, Optional[float]] = {k: None for k in MAP_KINDS}
    fitr: dict[str, Optional[float]] = {k: None for k in MAP_KINDS}
    mats: dict[str, Optional[torch.Tensor]] = {"identity": None}
    scale: Optional[float] = None
    alpha: Optional[float] = None
    rank: Optional[int] = None
    under = False
    if same_width:
        held["identity"], fitr["identity"] = _res(Xh, Yh), _res(Xf, Yf)
    if force == "identity" and not same_width:
        raise GraftError(f"identity map impossible: widths differ ({d_src} -> {d_dst})")
    coincide = held["identity"] is not None and held["identity"] <= identity_tol
    # Rule 1's first clause and a forced identity do not depend on the other candidates: skip their
    # fits (O(d^3) each) unless asked to report them.
    skip = not fit_all and ((force == "auto" and coincide) or force == "identity")
    # Fewer fit rows than the width leave the rotation undetermined: its completion is a choice
    # (closest to the identity) that costs O(d^3), so auto does not consider it there (T3's rule).
    determined = n_fit >= min(d_src, d_dst)
    if not skip and (determined or force == "procrustes" or fit_all):
        pf = procrustes_fit(Xf, Yf)
        XR = Xf @ pf.R
        den = float(XR.pow(2).sum())
        scale = max(float((XR * Yf).sum()) / den, 0.0) if den > 0 else 0.0
        mats["procrustes"] = scale * pf.R
        rank, under = pf.rank, pf.underdetermined
        held["procrustes"], fitr["procrustes"] = (
            _res(Xh @ mats["procrustes"], Yh),
            _res(Xf @ mats["procrustes"], Yf),
        )
    elif not skip:
        under = True
    if not skip:
        alpha = (
            ridge_alpha
            if ridge_alpha > 0
            else choose_ridge_alpha(Xf, Yf, None if group is None else group[fit], seed)
        )
        W = ridge_map(Xf, Yf, alpha)
        mats["ridge"] = W
        held["ridge"], fitr["ridge"] = _res(Xh @ W, Yh), _res(Xf @ W, Yf)
    r_i, r_p, r_w = held["identity"], held["procrustes"], held["ridge"]
    if force != "auto":
        kind, reason = force, "forced"
    elif coincide:
        kind, reason = (
            "identity",
            f"identity held-out residual {r_i:.3g} <= {identity_tol:g}: the spaces coincide",
        )
    else:
        assert r_w is not None
        if r_i is not None and r_i <= min(r_w, r_p if r_p is not None else r_w):
            kind, reason = "identity", "no fitted map does better than the identity on held-out rows"
        elif r_p is None:
            kind, reason = (
                "ridge",
                f"{n_fit} fit rows do not determine a rotation of width {min(d_src, d_dst)} (more tokens "
                "would): ridge",
            )
        elif r_p <= r_w + procrustes_tol:
            kind, reason = (
                "procrustes",
                f"a rotation explains the side (held-out {r_p:.3g} vs ridge {r_w:.3g}, tolerance "
                f"{procrustes_tol:g})",
            )
        else:
            kind, reason = (
                "ridge",
                f"not a rotation: ridge held-out {r_w:.3g} beats procrustes {r_p:.3g} by more than "
                f"{procrustes_tol:g}",
            )
    chosen_held, chosen_fit = held[kind], fitr[kind]
    assert chosen_held is not None and chosen_fit is not None
    return SideMap(
        kind=kind,
        matrix=mats.get(kind),
        heldout_residual=chosen_held,
        fit_residual=chosen_fit,
        residuals=held,
        fit_residuals=fitr,
        scale=scale,
        ridge_alpha=alpha,
        rank=rank,
        underdetermined=under,
        d_src=d_src,
        d_dst=d_dst,
        n_fit=n_fit,
        n_heldout=n_ho,
        reason=reason,
    )
