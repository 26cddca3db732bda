"""T3's Procrustes maps for many layers at once, by Newton's iteration for the polar factor.

The map of a full-rank cross-product ``M = X^T Y`` is its orthogonal polar factor ``U V^T``. A GPU
takes about as long for a float64 SVD of 576 x 576 as 16 host cores (30 of them: 1.18 s on an
H200, looped or batched), and that was most of T3 there. The scaled Newton iteration

    X_0 = M,   X_{k+1} = (mu_k X_k + X_k^{-T} / mu_k) / 2,   mu_k = (||X_k^{-1}||_F / ||X_k||_F)^{1/2}

(Higham, *Functions of Matrices*, 2008, section 8.6) reaches the same factor with a handful of batched
float64 inverses, which a GPU does fast. Its forward error is about ``kappa(M) * eps``, as the SVD's
is; the real demo pair's cross-products have kappa from 4e5 to 2e8 (concept set, 2,048 tokens).

Newton is only used where the map is certainly unique: ``kappa_2(M) <= ||M||_F ||M^{-1}||_F`` must be
below :data:`NEWTON_MAX_COND`, ten times inside ``1 / PROCRUSTES_RTOL``, so every singular value is
above the rank tolerance and the SVD route would also call the map unique. A layer that fails this,
or does not converge, or whose result is not orthogonal to 1e-10, takes the SVD route
(:func:`engine.measure.linalg.procrustes_from_cross`) with its rank test and completion. Unequal widths are
first reduced by a QR of the taller side, so Newton runs on a square triangle factor.

On the CPU one float64 inverse of 576 x 576 costs a quarter of an SVD and Newton needs about ten, so
T3 keeps the SVD there (:func:`cross_fits` with ``newton=False``).
"""

from __future__ import annotations

import torch

from .linalg import COMPLETION_UNIQUE, PROCRUSTES_RTOL, ProcrustesFit, procrustes_from_cross

NEWTON_MAX_COND = 0.1 / PROCRUSTES_RTOL
NEWTON_MAX_STEPS = 40
NEWTON_TOL = 1e-13  # stop when a step moves X by less than this, relative (Frobenius)
ORTHOGONALITY_TOL = 1e-10


def _fro(A: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(A).unsqueeze(-1).unsqueeze(-1)  # (B, 1, 1)


def polar_newton(M: torch.Tensor, max_cond: float = NEWTON_MAX_COND) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal polar factors of a batch ``M`` (B, m, n), float64, by scaled Newton iteration.

    Returns ``(R, ok)``: R (B, m, n) with orthonormal columns (m >= n) or rows (m < n), and ``ok``
    (B,) bool, True where the factor is certified (full rank with ``kappa_F < max_cond``,
    converged, orthogonal to ``ORTHOGONALITY_TOL``). Entries with ``ok`` False hold no usable value.
    """
    if M.ndim != 3 or M.dtype != torch.float64:
        raise ValueError("polar_newton takes a (B, m, n) float64 batch")
    B, m, n = M.shape
    wide = m < n
    A = M.transpose(1, 2) if wide else M  # (B, p, q), p >= q
    Q = None
    if A.shape[1] > A.shape[2]:
        Q, A = torch.linalg.qr(A)  # A = Q T: the polar factor of A is Q times that of T (q x q)
    q = A.shape[-1]
    eye = torch.eye(q, dtype=A.dtype, device=A.device).expand(B, q, q)
    Xinv, info = torch.linalg.inv_ex(A)
    nx, ni = _fro(A), _fro(Xinv)
    ok = (info == 0) & torch.isfinite(ni.view(B)) & ((nx * ni).view(B) < max_cond) & (nx.view(B) > 0)
    keep = ok.view(B, 1, 1)
    X = torch.where(keep, A, eye)  # uncertified entries iterate on the identity (done at once)
    Xinv = torch.where(keep, Xinv, eye)
    nx, ni = torch.where(keep, nx, 1.0), torch.where(keep, ni, 1.0)
    converged = torch.zeros(B, dtype=torch.bool, device=M.device)
    scaled = True
    for _ in range(NEWTON_MAX_STEPS):
        mu = (ni / nx).sqrt() if scaled else 1.0
        Xn = 0.5 * (mu * X + Xinv.transpose(1, 2) / mu)
        step = (_fro(Xn - X) / _fro(Xn)).view(B)
        X = Xn
        worst = float(step.max())  # one host sync per step
        if worst <= NEWTON_TOL:
            converged[:] = True
            break
        scaled = scaled and worst > 1e-2  # near the factor, unscaled steps converge quadratically
        Xinv, info = torch.linalg.inv_ex(X)
        ok &= info == 0
        nx, ni = _fro(X), _fro(Xinv)
    ok &= converged
    orth = _fro(X.transpose(1, 2) @ X - eye).view(B) <= ORTHOGONALITY_TOL
    ok &= orth
    R = X if Q is None else Q @ X
    return (R.transpose(1, 2) if wide else R), ok


def cross_fits(Ms: list[torch.Tensor], newton: bool, rtol: float = PROCRUSTES_RTOL) -> list[ProcrustesFit]:
    """:func:`engine.measure.linalg.procrustes_from_cross` for each float64 cross-product in ``Ms`` (all of
    one shape). With ``newton`` the certified ones come from one batched :func:`polar_newton`
    (unique maps: rank = min(dx, dy), ``cross`` = <R, M> = the sum of M's singular values) and the
    rest from the SVD route, so every map is the one the SVD route gives, to round-off."""
    if not newton or not Ms:
        return [procrustes_from_cross(M, rtol) for M in Ms]
    Mb = torch.stack(Ms)
    R, ok = polar_newton(Mb, 0.1 / rtol)
    cross = (R * Mb).sum((1, 2))
    ok_host, cross_host = ok.tolist(), cross.tolist()
    full = min(Ms[0].shape)
    return [
        ProcrustesFit(R[k], full, COMPLETION_UNIQUE, cross_host[k])
        if ok_host[k]
        else procrustes_from_cross(M, rtol)
        for k, M in enumerate(Ms)
    ]
