"""Linear algebra behind T2-T4: monotone layer matching, Procrustes, ridge (linear CKA:
:mod:`engine.measure.cka`).

All functions take row matrices ``(n, d)`` (one row per aligned token) and compute in float64
for stability; inputs are never modified.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


def compute_device(device: torch.device, nbytes: int, headroom: float = 4.0) -> torch.device:
    """Where T2-T4's linear algebra runs: the models' CUDA ``device`` when ``headroom`` times the
    ``nbytes`` of rows it reads fits in that device's free memory (the tools make centred, gathered
    and float64 copies of them), else the CPU. (A capture on CUDA keeps its residual stream there
    while it fits, :mod:`engine.measure.capture`; rows found elsewhere are copied once per pair.)"""
    if device.type != "cuda" or not torch.cuda.is_available():
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if headroom * nbytes <= free else torch.device("cpu")


@contextmanager
def ieee_float32(device: torch.device) -> Iterator[None]:
    """float32 products in full precision on CUDA while T2-T4 run there: with TF32 allowed (a
    process-wide setting a host program may have made) CKA's float32 Gram blocks would round at
    about 1e-3 instead of 1e-7."""
    if device.type != "cuda":
        yield
        return
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def monotone_matching(S: torch.Tensor) -> list[tuple[int, int]]:
    """Non-decreasing map i -> j maximising sum_i S[i, j(i)] (dynamic programming, O(Lx Ly)).

    best[i, j] = S[i, j] + max_{j' <= j} best[i-1, j']; ties go to the smaller j.
    """
    Lx, Ly = S.shape
    S = S.double()
    best = torch.empty(Lx, Ly, dtype=torch.float64)
    arg = torch.zeros(Lx, Ly, dtype=torch.long)
    best[0] = S[0]
    for i in range(1, Lx):
        prev = best[i - 1]
        run_val, run_arg = prev[0].item(), 0
        for j in range(Ly):
            if prev[j].item() > run_val:
                run_val, run_arg = prev[j].item(), j
            best[i, j] = S[i, j] + run_val
            arg[i, j] = run_arg
    j = int(torch.argmax(best[-1]).item())
    path = [j]
    for i in range(Lx - 1, 0, -1):
        j = int(arg[i, j].item())
        path.append(j)
    path.reverse()
    return [(i, path[i]) for i in range(Lx)]


def split_rows(
    group: torch.Tensor, heldout_fraction: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (fit, heldout). Whole texts are held out when there are at least 4 texts,
    so held-out rows never share a context with fit rows; otherwise a seeded row split."""
    g = torch.Generator().manual_seed(seed)
    groups = group.unique()
    n = group.numel()
    if groups.numel() >= 4:
        perm = groups[torch.randperm(groups.numel(), generator=g)]
        n_ho = max(1, int(round(heldout_fraction * groups.numel())))
        held = torch.isin(group, perm[:n_ho])
    else:
        perm = torch.randperm(n, generator=g)
        held = torch.zeros(n, dtype=torch.bool)
        held[perm[: max(1, int(round(heldout_fraction * n)))]] = True
    return ~held, held


@dataclass
class Standardiser:
    """Centre with the fit rows' mean and scale so the fit rows have unit Frobenius norm."""

    mean: torch.Tensor
    scale: float

    @classmethod
    def fit(cls, X: torch.Tensor) -> "Standardiser":
        mu = X.mean(0, keepdim=True)
        s = float(torch.linalg.matrix_norm(X - mu))
        return cls(mu, s if s > 0 else 1.0)

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        return (X - self.mean) / self.scale


PROCRUSTES_RTOL = 1e-10
"""Relative tolerance of the numerical rank of ``X^T Y`` in :func:`procrustes_fit`: singular
values at or below ``PROCRUSTES_RTOL * s_max`` count as zero. In float64 the singular values that
exact rank deficiency leaves behind (fewer centred fit rows than the width) sit at round-off,
about 1e-15 * s_max; genuine directions this weak change no residual visibly either way."""

COMPLETION_UNIQUE = "unique"
COMPLETION_IDENTITY = "closest to identity"
COMPLETION_SPAN = "within fit span"


@dataclass
class ProcrustesFit:
    """An orthogonal Procrustes map with what decided it.

    ``R``: (dx, dy). ``rank``: numerical rank of ``X^T Y`` (see :data:`PROCRUSTES_RTOL`).
    ``completion``: ``"unique"`` when ``rank == min(dx, dy)`` (the minimiser is unique), else
    ``"closest to identity"`` (equal widths) or ``"within fit span"`` (unequal widths).
    """

    R: Optional[torch.Tensor]  # None when only the rank was computed (T3's thin case)
    rank: int
    completion: str
    # <R, X^T Y> = the sum of the singular values of X^T Y above the rank tolerance (exact for a
    # unique map; a completion adds at most the ones counted as zero, each <= rtol * s_max)
    cross: float = float("nan")
    full: int = 0  # min(dx, dy) when R is None

    @property
    def full_rank(self) -> int:
        return min(self.R.shape) if self.R is not None else self.full

    @property
    def underdetermined(self) -> bool:
        """True when ``||X R - Y||_F`` has more than one orthogonal minimiser: the rank of
        ``X^T Y`` is below ``min(dx, dy)`` (e.g. fewer centred fit rows than the width)."""
        return self.rank < self.full_rank


def procrustes_fit(X: torch.Tensor, Y: torch.Tensor, rtol: float = PROCRUSTES_RTOL) -> ProcrustesFit:
    """R = argmin ||X R - Y||_F s.t. R has orthonormal rows or columns (R^T R = I when dx >= dy,
    R R^T = I when dx <= dy), made unique when the minimiser is not.

    With M = X^T Y = U S V^T (full SVD) and r its numerical rank (singular values above
    ``rtol * s_max``), every minimiser is ``U_r V_r^T + (anything orthogonal between the null
    spaces)``: ``U_r V_r^T`` is fixed by the data, the rest is not (the fit rows say nothing about
    directions outside their span). When ``r == min(dx, dy)`` this is the usual unique ``U V^T``.
    Otherwise:

    * equal widths (``"closest to identity"``): ``R = U_r V_r^T + U_perp Q V_perp^T`` with ``Q``
      the orthogonal polar factor of ``U_perp^T V_perp``, which maximises ``tr(U_perp Q V_perp^T)``,
      i.e. the exact minimiser closest to the identity in Frobenius norm. It does not depend on
      which bases the SVD picks for the null spaces (they enter only as ``U_perp U_perp^T`` and
      ``V_perp V_perp^T``); a model against itself gives ``R = I`` at any number of rows. (When
      ``U_perp^T V_perp`` is itself singular, the null spaces meet at a right angle and the
      closest completion is not unique either: the one returned is still an exact minimiser
      closest to the identity, deterministic for the given inputs.)
    * unequal widths (``"within fit span"``): the partial isometry ``R = U_r V_r^T``, which maps
      only within the span the fit rows determine; held-out directions off it map to 0 and count
      as unexplained in the residual.

    X: (n, dx), Y: (n, dy); computed in float64, returned in the inputs' (promoted) dtype.
    """
    dtype = torch.promote_types(X.dtype, Y.dtype)
    X, Y = X.double(), Y.double()
    if 0 < X.shape[0] < min(X.shape[1], Y.shape[1]):
        fit = _procrustes_thin(X, Y, rtol)
    else:
        fit = procrustes_from_cross(X.T @ Y, rtol)
    return ProcrustesFit(fit.R.to(dtype), fit.rank, fit.completion, fit.cross)


def procrustes_from_cross(M: torch.Tensor, rtol: float = PROCRUSTES_RTOL) -> ProcrustesFit:
    """:func:`procrustes_fit` from the cross-product ``M = X^T Y`` (float64, (dx, dy)), for callers
    that already hold it (T3 shares it with the ridge map). Returns R in float64."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=True)
    return _procrustes_from_svd(U, S, Vh.T, M.shape, rtol)


def _procrustes_thin(X: torch.Tensor, Y: torch.Tensor, rtol: float) -> ProcrustesFit:
    """Fewer rows than either width (n < min(dx, dy)): the Gram form. With X^T = Qx Rx and
    Y^T = Qy Ry (QR), M = Qx (Rx Ry^T) Qy^T, so the n x n core's SVD gives M's n largest
    singular values and their vectors; the rest of M's spectrum is exactly 0. The QRs are complete,
    so the null-space bases the completion needs come with them: U = [Qx Uc, Qx_perp]."""
    n = X.shape[0]
    Qx, Rx = torch.linalg.qr(X.T, mode="complete")  # (dx, dx), (dx, n)
    Qy, Ry = torch.linalg.qr(Y.T, mode="complete")
    Uc, S, Vch = torch.linalg.svd(Rx[:n] @ Ry[:n].T)
    U = torch.cat([Qx[:, :n] @ Uc, Qx[:, n:]], 1)
    V = torch.cat([Qy[:, :n] @ Vch.T, Qy[:, n:]], 1)
    return _procrustes_from_svd(U, S, V, (X.shape[1], Y.shape[1]), rtol)


def _procrustes_from_svd(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, shape: tuple[int, int], rtol: float
) -> ProcrustesFit:
    """The map from M's full SVD: U (dx, dx) and V (dy, dy) orthogonal, S descending; their columns
    past the rank are the null-space bases the completion needs (which bases does not matter, see
    :func:`procrustes_fit`)."""
    dx, dy = shape
    smax = float(S[0]) if S.numel() else 0.0
    rank = int((S > rtol * smax).sum()) if smax > 0 else 0
    R = U[:, :rank] @ V[:, :rank].T
    if rank == min(dx, dy):
        completion = COMPLETION_UNIQUE
    elif dx == dy:
        Up, Vp = U[:, rank:], V[:, rank:]  # bases of the null spaces of M^T and M
        A, _, Bh = torch.linalg.svd(Up.T @ Vp)
        R = R + (Up @ A) @ (Vp @ Bh.T).T
        completion = COMPLETION_IDENTITY
    else:
        completion = COMPLETION_SPAN
    return ProcrustesFit(R, rank, completion, float(S[:rank].sum()))


def procrustes_map(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """The map of :func:`procrustes_fit` alone: U V^T of the SVD of X^T Y when that is unique,
    else the completion documented there. X: (n, dx), Y: (n, dy) -> R: (dx, dy)."""
    return procrustes_fit(X, Y).R


def gram(X: torch.Tensor, parts: int = 4) -> torch.Tensor:
    """``X^T X`` for X (n, d). On a CPU, from ``parts`` column blocks: each block times the columns
    from its own on, mirrored below the diagonal, which is 5/8 of the product's flops with 4 blocks
    (a float64 Gram of 1,032 x 576 takes 9.8 ms instead of 14.6 on one thread here). One product on
    CUDA, where a loop of products costs more than it saves, or when X is narrow."""
    d = X.shape[1]
    if X.is_cuda or d < 256:
        return X.T @ X
    G = torch.empty(d, d, dtype=X.dtype, device=X.device)
    cuts = [d * k // parts for k in range(parts + 1)]
    for a, b in zip(cuts, cuts[1:]):
        block = X[:, a:b].T @ X[:, a:]  # (b - a, d - a)
        G[a:b, a:] = block
        G[a:, a:b] = block.T
    return G


def ridge_map(X: torch.Tensor, Y: torch.Tensor, alpha: float) -> torch.Tensor:
    """W = argmin ||X W - Y||_F^2 + lam ||W||_F^2 with lam = alpha * tr(X^T X) / dx (scale-free)."""
    return RidgeFactor.of(gram(X), alpha).solve(X.T @ Y)


@dataclass
class RidgeFactor:
    """``A = G + lam I`` with ``lam = alpha * tr(G) / d`` (G = X^T X), factored once (Cholesky) so
    that several right-hand sides reuse it. ``chol`` is None when A is not positive definite
    (alpha = 0 on rank-deficient rows): :meth:`solve` then falls back to a general solve."""

    A: torch.Tensor
    lam: float
    chol: Optional[torch.Tensor]

    @classmethod
    def of(cls, G: torch.Tensor, alpha: float) -> "RidgeFactor":
        return cls.shifted(G, alpha * float(torch.trace(G)) / G.shape[0])

    @classmethod
    def shifted(cls, G: torch.Tensor, lam: float) -> "RidgeFactor":
        """``A = G + lam I`` for a given shift (the dual forms take lam from the primal's trace)."""
        A = G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        L, info = torch.linalg.cholesky_ex(A)
        return cls(A, lam, L if int(info) == 0 else None)

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """A^{-1} B."""
        return torch.cholesky_solve(B, self.chol) if self.chol is not None else torch.linalg.solve(self.A, B)


def residual(pred: torch.Tensor, Y: torch.Tensor) -> float:
    """Normalised residual ||pred - Y||_F^2 / ||Y||_F^2."""
    den = float(Y.pow(2).sum())
    return float((pred - Y).pow(2).sum()) / den if den > 0 else float("nan")


def random_orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R)).unsqueeze(0)
