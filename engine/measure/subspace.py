"""Procrustes where the fit rows define it (docs/methods.md, T3 "Underdetermined fits").

With fewer fit rows than the width, a whole-space orthogonal map is not determined by the data.
T3 then measures the fit in each side's top principal subspace of its fit rows
(:func:`subspace_fit`), gets the rank of ``X^T Y`` from the same thin SVDs (:func:`thin_rank`), and
skips the whole-space completion. The thin SVDs come from the n x n Gram matrix
(:func:`thin_svds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .linalg import PROCRUSTES_RTOL, ProcrustesFit, procrustes_fit, residual


def finite_residual(pred: torch.Tensor, Y: torch.Tensor) -> float:
    """``residual``, 1.0 (nothing explained) where it is undefined (held-out rows all zero)."""
    r = residual(pred, Y)
    return r if math.isfinite(r) else 1.0


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
        finite_residual(A @ pf.R, B),
        finite_residual(Ah @ pf.R, Bh),
        float(Bh.pow(2).sum()) / yy if yy > 0 else 0.0,
    )
