"""T3's fit of one matched layer pair (docs/methods.md, T3): standardise with the fit rows'
statistics, fit the orthogonal map and the ridge baseline, and score both on the fit and held-out
rows. :func:`prepare_pair` does everything up to the orthogonal map (so the CUDA route can batch
every layer's polar factors), :func:`finish_pair` the rest; :func:`fit_pair` is both. With fewer fit
rows than the widths the map is scored where the rows define it (:mod:`engine.measure.subspace`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .linalg import (
    COMPLETION_SPAN,
    ProcrustesFit,
    RidgeFactor,
    Standardiser,
    gram,
    procrustes_from_cross,
)
from .subspace import ESTIMATOR_SUBSPACE, finite_residual, subspace_fit, thin_rank, thin_svds


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
    rank: int  # numerical rank of X^T Y on the (standardised) fit rows; min(dx, dy) = fully determined
    underdetermined: bool  # rank < min(dx, dy): the orthogonal map was completed (see ``completion``)
    # How residual_heldout was measured: "full" (the whole space, the map unique), or "principal
    # subspace" when underdetermined: both sides projected on the top ``subspace_rank`` principal
    # directions of their own fit rows, an r x r map fitted there, held-out rows projected the same way.
    estimator: str = "full"
    subspace_rank: Optional[int] = None
    # share of the target's held-out energy inside its principal subspace (what the figure speaks for)
    heldout_energy_in_subspace: Optional[float] = None
    # the full-space held-out residual of the completed map (underdetermined layers only): it depends
    # on the completion, not on the data, and is kept for comparison, never as the headline
    residual_heldout_completed: Optional[float] = None


def fit_pair(
    X: torch.Tensor, Y: torch.Tensor, fit: torch.Tensor, held: torch.Tensor, alpha: float, i: int, j: int
) -> ProcrustesLayer:
    """One matched pair: standardise (fit-row statistics), fit the orthogonal map R and the ridge
    map W, and score both on the fit and held-out rows (float64; held-out rows through R in float32,
    which moves the residuals by about 1e-7).

    Fewer fit rows than the widths (n < min(dx, dy)): R from the thin QR form
    (:func:`engine.measure.linalg.procrustes_fit`), and W in its dual (Woodbury) form
    ``W = Xf^T Z, Z = (Xf Xf^T + lam I)^{-1} Yf``, so nothing d x d is factored: fit predictions
    ``Xf W = Yf - lam Z`` and held-out ones ``(Xh Xf^T) Z``. Otherwise both maps come from two
    products: ``Gx = Xf^T Xf`` for the ridge (:func:`engine.measure.linalg.gram`) and ``M = Xf^T Yf``,
    shared by both maps. ``fit`` and ``held``: boolean row masks or row indices.

    Fit residuals come from those products: ``||Xf B - Yf||^2 = <B, Gx B> - 2 <B, M> + ||Yf||^2``,
    where ``<R, Gx R> = ||Xf||^2`` when R is orthogonal, ``<R, M>`` is the sum of M's singular values
    (the ones above the rank tolerance), and ``Gx W = M - lam W`` for the ridge map.
    """
    p = prepare_pair(X, Y, fit, held, alpha, i, j)
    if p.pf is None:
        p.pf = procrustes_from_cross(p.M)
    return finish_pair(p)


@dataclass
class _Pair:
    """One layer pair between :func:`_prepare` (standardised rows, ridge scores, the cross-product
    M) and :func:`_finish` (the Procrustes scores once the map ``pf`` is known)."""

    i: int
    j: int
    Xh: torch.Tensor
    Yh: torch.Tensor
    xx: float
    yy: float
    fit_w: float
    ridge: float
    pf: Optional[ProcrustesFit]  # set by _prepare on the thin path, else from M
    M: Optional[torch.Tensor]
    Gx: Optional[torch.Tensor]  # Xf^T Xf, kept for ||Xf R||^2 = <R, Gx R> when R is not square
    Xf: Optional[torch.Tensor]  # kept on the thin path when R is not square
    Xf_all: Optional[torch.Tensor] = None  # standardised fit rows, for the principal-subspace estimate
    Yf_all: Optional[torch.Tensor] = None
    svds: Optional[tuple[Any, Any]] = None  # their thin SVDs, when computed for the rank


def prepare_pair(
    X: torch.Tensor, Y: torch.Tensor, fit: torch.Tensor, held: torch.Tensor, alpha: float, i: int, j: int
) -> _Pair:
    fit, held = _index(fit), _index(held)
    Xf, Xh = X.index_select(0, fit).double(), X.index_select(0, held).double()
    Yf, Yh = Y.index_select(0, fit).double(), Y.index_select(0, held).double()
    sx, sy = Standardiser.fit(Xf), Standardiser.fit(Yf)
    Xf, Xh, Yf, Yh = sx(Xf), sx(Xh), sy(Yf), sy(Yh)
    dx, dy = X.shape[1], Y.shape[1]
    yy = float(Yf.pow(2).sum())
    xx = float(Xf.pow(2).sum())  # = tr(Xf^T Xf)
    lam = alpha * xx / dx  # as engine.measure.linalg.RidgeFactor
    pf = M = Gx = svds = None
    if Xf.shape[0] < min(dx, dy) and lam > 0:
        svds = thin_svds(Xf, Yf)
        pf = thin_rank(Xf, Yf, svds=svds)
        Z = RidgeFactor.shifted(gram(Xf.T), lam).solve(Yf)  # (n, dy)
        fit_w = _ratio(lam * lam * float(Z.pow(2).sum()), yy)
        pred_w = (Xh @ Xf.T) @ Z
    else:
        Gx, Mxy = gram(Xf), Xf.T @ Yf
        M = Mxy
        if Xf.shape[0] < min(dx, dy):  # few rows and no ridge shift: the thin form for R
            svds = thin_svds(Xf, Yf)
            pf, M = thin_rank(Xf, Yf, svds=svds), None
        rf = RidgeFactor.of(Gx, alpha)
        W = rf.solve(Mxy)
        if rf.chol is not None:
            fit_w = _ratio(yy - float((W * Mxy).sum()) - rf.lam * float(W.pow(2).sum()), yy)
        else:
            fit_w = finite_residual(Xf @ W, Yf)
        pred_w = (Xh.float() @ W.float()).double()
    square = dx == dy
    return _Pair(
        i,
        j,
        Xh,
        Yh,
        xx,
        yy,
        fit_w,
        finite_residual(pred_w, Yh),
        pf,
        M,
        None if square else Gx,
        None if square or Gx is not None else Xf,
        Xf,
        Yf,
        svds,
    )


def _index(rows: torch.Tensor) -> torch.Tensor:
    """Row indices from a boolean mask (or indices as given): a mask would be turned into indices
    again by every indexing."""
    return rows.nonzero().squeeze(1) if rows.dtype == torch.bool else rows


def finish_pair(p: _Pair) -> ProcrustesLayer:
    pf = p.pf
    if pf.R is None:  # fewer fit rows than the widths: the principal-subspace estimate only
        return _finish_thin(p)
    R = pf.R  # (dx, dy)
    dx, dy = R.shape
    if dx == dy and pf.completion != COMPLETION_SPAN:  # R orthogonal
        xrr = p.xx
    elif p.Gx is not None:
        xrr = float((p.Gx @ R * R).sum())  # ||Xf R||^2
    else:
        xrr = float((p.Xf @ R).pow(2).sum())
    fit_r = _ratio(xrr - 2.0 * pf.cross + p.yy, p.yy)
    rh = finite_residual((p.Xh.float() @ R.float()).double(), p.Yh)
    ident = finite_residual(p.Xh, p.Yh) if dx == dy else None
    sub = None
    if pf.underdetermined and p.Xf_all is not None:
        sub = subspace_fit(p.Xf_all, p.Yf_all, p.Xh, p.Yh)
    p.Xf_all = p.Yf_all = None
    held = rh if sub is None else sub.residual_heldout
    return ProcrustesLayer(
        donor_layer=p.i,
        target_layer=p.j,
        residual_fit=round(fit_r if sub is None else sub.residual_fit, 6),
        residual_heldout=round(held, 6),
        residual_ridge=round(p.ridge, 6),
        residual_ridge_fit=round(p.fit_w, 6),
        residual_identity=None if ident is None else round(ident, 6),
        alignment=round(1.0 - held, 6),
        rank=pf.rank,
        underdetermined=pf.underdetermined,
        estimator="full" if sub is None else ESTIMATOR_SUBSPACE,
        subspace_rank=None if sub is None else sub.rank,
        heldout_energy_in_subspace=None if sub is None else round(sub.energy, 6),
        residual_heldout_completed=None if sub is None else round(rh, 6),
    )


def _finish_thin(p: _Pair) -> ProcrustesLayer:
    sub = subspace_fit(p.Xf_all, p.Yf_all, p.Xh, p.Yh, p.svds)
    p.Xf_all = p.Yf_all = p.svds = None
    dx, dy = int(p.Xh.shape[1]), int(p.Yh.shape[1])
    ident = finite_residual(p.Xh, p.Yh) if dx == dy else None
    return ProcrustesLayer(
        donor_layer=p.i,
        target_layer=p.j,
        residual_fit=round(sub.residual_fit, 6),
        residual_heldout=round(sub.residual_heldout, 6),
        residual_ridge=round(p.ridge, 6),
        residual_ridge_fit=round(p.fit_w, 6),
        residual_identity=None if ident is None else round(ident, 6),
        alignment=round(1.0 - sub.residual_heldout, 6),
        rank=p.pf.rank,
        underdetermined=True,
        estimator=ESTIMATOR_SUBSPACE,
        subspace_rank=sub.rank,
        heldout_energy_in_subspace=round(sub.energy, 6),
        residual_heldout_completed=None,
    )


def _ratio(num: float, den: float) -> float:
    """A residual from sums of products: clipped at 0 (round-off), 1.0 when undefined (as
    :func:`engine.measure.subspace.finite_residual`)."""
    return max(0.0, num) / den if den > 0 else 1.0
