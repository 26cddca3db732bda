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

import math
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
    PROCRUSTES_RTOL,
    ProcrustesFit,
    RidgeFactor,
    Standardiser,
    gram,
    ieee_float32,
    monotone_matching,
    procrustes_fit,
    procrustes_from_cross,
    residual,
    split_rows,
)
from ..measure.polar import cross_fits
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
                    _prepare(
                        al.X[i + 1].to(dev), al.Y[j + 1].to(dev), fit_d, held_d, params.ridge_alpha, i, j
                    )
                )
            progress(0.95, "Procrustes maps")
            todo = [p for p in preps if p.pf is None]
            for p, pf in zip(todo, cross_fits([p.M for p in todo], newton=True)):
                p.pf = pf
            layers = [_finish(p).__dict__ for p in preps]
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
    progress(1.0, "done")
    dx, dy = int(al.X.shape[2]), int(al.Y.shape[2])
    n_fit = int(fit.sum())
    completion = COMPLETION_UNIQUE
    if any(l["underdetermined"] for l in layers):
        completion = COMPLETION_IDENTITY if dx == dy else COMPLETION_SPAN
        if all(l["residual_heldout_completed"] is None for l in layers if l["underdetermined"]):
            completion = COMPLETION_NONE
    need = max(dx, dy) + 2  # centring costs a row: n_fit - 1 >= width
    rows = int(al.X.shape[1])
    meta = getattr(ctx, "meta", None) or {}
    n_tok = int(meta.get("n_tokens_target") or rows)
    tokens_needed = int(need / max(1e-9, 1 - params.heldout_fraction) * n_tok / max(rows, 1)) + 1
    return ProcrustesResult(
        layers=layers,
        mean_alignment=round(sum(l["alignment"] for l in layers) / len(layers), 6),
        pairs=params.pairs,
        n_fit=n_fit,
        n_heldout=int(held.sum()),
        alignment=al.mode,
        donor_width=dx,
        target_width=dy,
        rows_per_width=round(n_fit / max(dx, dy), 6),
        completion=completion,
        warnings=procrustes_warnings(layers, n_fit, dx, dy, tokens_needed, meta.get("memory_plan")),
        estimator=ESTIMATOR_SUBSPACE if any(l["estimator"] != "full" for l in layers) else "full",
        rows_needed=need,
        tokens_needed=tokens_needed,
    )


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
    p = _prepare(X, Y, fit, held, alpha, i, j)
    if p.pf is None:
        p.pf = procrustes_from_cross(p.M)
    return _finish(p)


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


def _prepare(
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
            fit_w = _residual(Xf @ W, Yf)
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
        _residual(pred_w, Yh),
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


def _finish(p: _Pair) -> ProcrustesLayer:
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
    rh = _residual((p.Xh.float() @ R.float()).double(), p.Yh)
    ident = _residual(p.Xh, p.Yh) if dx == dy else None
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


ESTIMATOR_SUBSPACE = "principal subspace"
COMPLETION_NONE = "not computed (fewer fit rows than the width)"


def thin_svds(Xf: torch.Tensor, Yf: torch.Tensor) -> tuple[Any, Any]:
    """Thin SVDs ``(U, S, Vh)`` of both sides' fit rows (float64, fewer rows than columns), shared
    by :func:`thin_rank` and :func:`subspace_fit`."""
    return _wide_svd(Xf.double()), _wide_svd(Yf.double())


def _wide_svd(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if A.shape[0] <= A.shape[1]:
        return _gram_svd(A)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U, S, Vh


def _gram_svd(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of a wide matrix A (n, d), n <= d, from the eigendecomposition of its n x n Gram
    matrix: ``A A^T = U S^2 U^T``, ``Vh = S^-1 U^T A`` for the singular values above round-off
    (Vh has that many rows). Five times faster than LAPACK's SVD of a 382 x 4,096 matrix here, and
    exact to round-off for the leading directions T3 uses (the squared condition number only
    touches the ones at round-off, which it drops)."""
    e, U = torch.linalg.eigh(A @ A.T)
    e, U = e.flip(0).clamp_min(0.0), U.flip(1)
    S = e.sqrt()
    keep = S > (float(S[0]) if S.numel() else 0.0) * 1e-7
    Vh = (U[:, keep] / S[keep]).T @ A
    return U, S, Vh


def thin_rank(
    Xf: torch.Tensor, Yf: torch.Tensor, rtol: float = PROCRUSTES_RTOL, svds: Optional[tuple[Any, Any]] = None
) -> ProcrustesFit:
    """With fewer fit rows than either width the map is underdetermined for certain (centring
    costs a row), so T3 reports the principal-subspace estimate (:func:`subspace_fit`) and skips
    the whole-space completion, which would cost an SVD of a (d - n) x (d - n) matrix per layer
    (minutes per layer at width 4,096) and measure Graft's choice rather than the models. Only the
    rank of ``X^T Y`` is computed, from the thin SVDs the estimate uses anyway: with
    ``X = Ux Sx Vx^T`` and ``Y = Uy Sy Vy^T``, ``X^T Y`` has the singular values of the n x n core
    ``Sx Ux^T Uy Sy``. ``R`` is None."""
    (Ux, Sx, _), (Uy, Sy, _) = svds if svds is not None else thin_svds(Xf, Yf)
    S = torch.linalg.svdvals(Sx[:, None] * (Ux.T @ Uy) * Sy[None, :])
    smax = float(S[0]) if S.numel() else 0.0
    rank = int((S > rtol * smax).sum()) if smax > 0 else 0
    return ProcrustesFit(
        None, rank, COMPLETION_NONE, float(S[:rank].sum()), full=min(Xf.shape[1], Yf.shape[1])
    )


def _finish_thin(p: _Pair) -> ProcrustesLayer:
    sub = subspace_fit(p.Xf_all, p.Yf_all, p.Xh, p.Yh, p.svds)
    p.Xf_all = p.Yf_all = p.svds = None
    dx, dy = int(p.Xh.shape[1]), int(p.Yh.shape[1])
    ident = _residual(p.Xh, p.Yh) if dx == dy else None
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


@dataclass
class SubspaceFit:
    rank: int
    residual_fit: float
    residual_heldout: float
    energy: float  # share of the target's held-out energy inside its principal subspace


def subspace_rank(n_fit: int, width: int) -> int:
    """r of the principal-subspace estimator: at least two centred fit rows per dimension, so the
    r x r map is determined with room to spare, and never more than the narrower width."""
    return max(1, min(width, (n_fit - 1) // 2))


def subspace_fit(
    Xf: torch.Tensor,
    Yf: torch.Tensor,
    Xh: torch.Tensor,
    Yh: torch.Tensor,
    svds: Optional[tuple[Any, Any]] = None,
) -> SubspaceFit:
    """Procrustes where the fit rows determine it: each side projected on the top r right singular
    vectors of its own (standardised) fit rows, an r x r orthogonal map fitted between the
    projections (unique: r is at most half the centred fit rows), and the held-out rows projected on
    the same bases. Defined at any number of rows; a model against itself, or in other orthogonal
    coordinates, scores 0. float64."""
    r = subspace_rank(int(Xf.shape[0]), min(int(Xf.shape[1]), int(Yf.shape[1])))
    sx, sy = svds if svds is not None else thin_svds(Xf, Yf)
    Vx, Vy = sx[2][:r].T, sy[2][:r].T  # (dx, r), (dy, r): the top r right singular vectors
    A, B = Xf @ Vx, Yf @ Vy
    pf = procrustes_fit(A, B)
    Ah, Bh = Xh @ Vx, Yh @ Vy
    yy = float(Yh.pow(2).sum())
    return SubspaceFit(
        r,
        _residual(A @ pf.R, B),
        _residual(Ah @ pf.R, Bh),
        float(Bh.pow(2).sum()) / yy if yy > 0 else 0.0,
    )


def _ratio(num: float, den: float) -> float:
    """A residual from sums of products: clipped at 0 (round-off), 1.0 when undefined (as
    :func:`_residual`)."""
    return max(0.0, num) / den if den > 0 else 1.0


def _residual(pred, Y) -> float:
    """``linalg.residual``, kept finite: held-out rows that are all zero after standardising
    (a constant layer) leave it undefined; report 1.0 (nothing explained) then."""
    r = residual(pred, Y)
    return r if math.isfinite(r) else 1.0


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
                cost += f", about {gib:.1f} GiB peak and {plan['t3_needed_seconds']:.0f} s here"
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
    )
)
