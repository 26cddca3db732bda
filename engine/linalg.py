"""Linear algebra behind T2-T4: linear CKA, monotone layer matching, Procrustes, ridge.

All functions take row matrices ``(n, d)`` (one row per aligned token) and compute in float64
for stability; inputs are never modified.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

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


def cka_matrix(Xs: torch.Tensor, Ys: torch.Tensor, progress: Optional[Progress] = None) -> torch.Tensor:
    """CKA between every X layer and every Y layer. Xs: (Lx, n, dx), Ys: (Ly, n, dy) -> (Lx, Ly).

    Uses the identity ||Xc^T Yc||_F^2 = <Xc Xc^T, Yc Yc^T> (Frobenius inner product of the n x n
    Gram matrices), which costs n^2 d per layer plus one (Lx x n^2) @ (n^2 x Ly) product, instead
    of n dx dy per pair; when n^2 is larger than dx*dy the feature-space form is used instead.
    """
    progress = progress or silent()
    Lx, n, dx = Xs.shape
    Ly, _, dy = Ys.shape
    use_gram = n * n <= 4 * dx * dy and (Lx + Ly) * n * n * 4 < 3e9
    if use_gram:
        def grams(S: torch.Tensor, frac: tuple[float, float]) -> torch.Tensor:
            out = torch.empty(S.shape[0], n * n, dtype=torch.float32)
            for l in range(S.shape[0]):
                progress(frac[0] + (frac[1] - frac[0]) * l / S.shape[0], "CKA: Gram matrices")
                Sc = centre(S[l].double())
                G = Sc @ Sc.T  # (n, n)
                G = G / torch.linalg.matrix_norm(G).clamp_min(1e-300)
                out[l] = G.reshape(-1).float()
            return out

        GX = grams(Xs, (0.0, 0.45))
        GY = grams(Ys, (0.45, 0.9))
        progress(0.9, "CKA: inner products")
        M = (GX.double() @ GY.double().T) if n * n * (Lx + Ly) < 2e8 else GX @ GY.T
        return M.double().clamp(0.0, 1.0)
    # Feature-space form: normalise each layer's covariance, then cross-covariances.
    Xc = [centre(Xs[l].double()) for l in range(Lx)]
    Yc = [centre(Ys[l].double()) for l in range(Ly)]
    nx = [torch.linalg.matrix_norm(x.T @ x) for x in Xc]
    ny = [torch.linalg.matrix_norm(y.T @ y) for y in Yc]
    M = torch.zeros(Lx, Ly, dtype=torch.float64)
    for i in range(Lx):
        progress(i / Lx, "CKA: cross-covariances")
        for j in range(Ly):
            M[i, j] = (Xc[i].T @ Yc[j]).pow(2).sum() / (nx[i] * ny[j]).clamp_min(1e-300)
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


def procrustes_map(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """R = argmin ||X R - Y||_F s.t. R^T R = I (semi-orthogonal if widths differ): U V^T of
    the thin SVD of X^T Y. X: (n, dx), Y: (n, dy) -> R: (dx, dy)."""
    U, _, Vh = torch.linalg.svd(X.T @ Y, full_matrices=False)
    return U @ Vh


def ridge_map(X: torch.Tensor, Y: torch.Tensor, alpha: float) -> torch.Tensor:
    """W = argmin ||X W - Y||_F^2 + lam ||W||_F^2 with lam = alpha * tr(X^T X) / dx (scale-free)."""
    G = X.T @ X
    lam = alpha * float(torch.trace(G)) / G.shape[0]
    return torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), X.T @ Y)


def residual(pred: torch.Tensor, Y: torch.Tensor) -> float:
    """Normalised residual ||pred - Y||_F^2 / ||Y||_F^2."""
    den = float(Y.pow(2).sum())
    return float((pred - Y).pow(2).sum()) / den if den > 0 else float("nan")


def mean_row_cosine(A: torch.Tensor, B: torch.Tensor) -> float:
    """Mean over rows of cos(A_r, B_r)."""
    return float(torch.nn.functional.cosine_similarity(A.double(), B.double(), dim=1, eps=1e-12).mean())


def random_orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R)).unsqueeze(0)


