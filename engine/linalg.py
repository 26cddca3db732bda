"""Linear algebra behind T2-T4: linear CKA, monotone layer matching, Procrustes, ridge.

All functions take row matrices ``(n, d)`` (one row per aligned token) and compute in float64
for stability; inputs are never modified.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .progress import Progress, silent


def centre(X: torch.Tensor) -> torch.Tensor:
    return X - X.mean(0, keepdim=True)


def cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA: ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), columns centred."""
    Xc, Yc = centre(X.double()), centre(Y.double())
    num = (Xc.T @ Yc).pow(2).sum()
    den = torch.linalg.matrix_norm(Xc.T @ Xc) * torch.linalg.matrix_norm(Yc.T @ Yc)
    return float(num / den) if den > 0 else 0.0


def cka_matrix(Xs: torch.Tensor, Ys: torch.Tensor, progress: Optional[Progress] = None,
               gram_memory_bytes: float = 3e9) -> torch.Tensor:
    """CKA between every X layer and every Y layer. Xs: (Lx, n, dx), Ys: (Ly, n, dy) -> (Lx, Ly).

    Two exact forms, chosen by flop count:
    * Gram form: ||Xc^T Yc||_F^2 = <Xc Xc^T, Yc Yc^T>_F. Each layer's centred n x n Gram matrix is
      normalised once (n^2 d flops per layer); all pairs are then one (Lx x n^2) @ (n^2 x Ly)
      product. Cheaper when n is small next to the widths times the layer count.
    * Feature form: one (dx x n) @ (n x Ly*dy) product per X layer (n dx dy flops per pair).
    Gram products run in float32 (normalisation and the final inner products in float64).
    """
    progress = progress or silent()
    Lx, n, dx = Xs.shape
    Ly, _, dy = Ys.shape
    gram_flops = (Lx * dx + Ly * dy) * n * n + Lx * Ly * n * n
    feat_flops = Lx * Ly * n * dx * dy + (Lx * dx * dx + Ly * dy * dy) * n
    use_gram = gram_flops < feat_flops and (Lx + Ly) * n * n * 4 < gram_memory_bytes
    if use_gram:
        def grams(S: torch.Tensor, frac: tuple[float, float]) -> torch.Tensor:
            out = torch.empty(S.shape[0], n * n, dtype=torch.float32)
            for l in range(S.shape[0]):
                progress(frac[0] + (frac[1] - frac[0]) * l / S.shape[0], "CKA: Gram matrices")
                Sc = centre(S[l].double()).float()
                G = (Sc @ Sc.T).double()  # (n, n)
                out[l] = (G / torch.linalg.matrix_norm(G).clamp_min(1e-300)).reshape(-1).float()
            return out

        GX = grams(Xs, (0.0, 0.45))
        GY = grams(Ys, (0.45, 0.9))
        progress(0.9, "CKA: inner products")
        # Column chunks in float64: a float32 sum over n^2 terms would lose ~1e-5 of accuracy.
        M = torch.zeros(Lx, Ly, dtype=torch.float64)
        chunk = max(1, int(2e7 // (Lx + Ly)))
        for c in range(0, n * n, chunk):
            M += GX[:, c:c + chunk].double() @ GY[:, c:c + chunk].double().T
        return M.clamp(0.0, 1.0)
    # Feature form: normalise each layer's covariance, then cross-covariances against all Y layers at once.
    Xc = [centre(Xs[l].double()) for l in range(Lx)]
    Ycat = torch.cat([centre(Ys[l].double()) for l in range(Ly)], dim=1)  # (n, Ly*dy)
    nx = torch.stack([torch.linalg.matrix_norm(x.T @ x) for x in Xc])
    ny = torch.stack([torch.linalg.matrix_norm(Ycat[:, j * dy:(j + 1) * dy].T @ Ycat[:, j * dy:(j + 1) * dy]) for j in range(Ly)])
    M = torch.zeros(Lx, Ly, dtype=torch.float64)
    for i in range(Lx):
        progress(i / Lx, "CKA: cross-covariances")
        C = (Xc[i].T @ Ycat).pow(2).reshape(dx, Ly, dy).sum(dim=(0, 2))  # (Ly,)
        M[i] = C / (nx[i] * ny).clamp_min(1e-300)
    return M.clamp(0.0, 1.0)


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


def split_rows(group: torch.Tensor, heldout_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
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

    R: torch.Tensor
    rank: int
    completion: str

    @property
    def full_rank(self) -> int:
        return min(self.R.shape)

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
    M = X.double().T @ Y.double()
    dx, dy = M.shape
    k = min(dx, dy)
    U, S, Vh = torch.linalg.svd(M, full_matrices=True)
    smax = float(S[0]) if S.numel() else 0.0
    rank = int((S > rtol * smax).sum()) if smax > 0 else 0
    R = U[:, :rank] @ Vh[:rank]
    if rank == k:
        completion = COMPLETION_UNIQUE
    elif dx == dy:
        Up, Vp = U[:, rank:], Vh[rank:].T  # bases of the null spaces of M^T and M
        A, _, Bh = torch.linalg.svd(Up.T @ Vp)
        R = R + Up @ (A @ Bh) @ Vp.T
        completion = COMPLETION_IDENTITY
    else:
        completion = COMPLETION_SPAN
    return ProcrustesFit(R.to(dtype), rank, completion)


def procrustes_map(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """The map of :func:`procrustes_fit` alone: U V^T of the SVD of X^T Y when that is unique,
    else the completion documented there. X: (n, dx), Y: (n, dy) -> R: (dx, dy)."""
    return procrustes_fit(X, Y).R


def ridge_map(X: torch.Tensor, Y: torch.Tensor, alpha: float) -> torch.Tensor:
    """W = argmin ||X W - Y||_F^2 + lam ||W||_F^2 with lam = alpha * tr(X^T X) / dx (scale-free)."""
    G = X.T @ X
    lam = alpha * float(torch.trace(G)) / G.shape[0]
    return torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), X.T @ Y)


def residual(pred: torch.Tensor, Y: torch.Tensor) -> float:
    """Normalised residual ||pred - Y||_F^2 / ||Y||_F^2."""
    den = float(Y.pow(2).sum())
    return float((pred - Y).pow(2).sum()) / den if den > 0 else float("nan")


def random_orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R)).unsqueeze(0)


