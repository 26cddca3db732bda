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


