"""Linear CKA (T2): one pair of row matrices, or every layer of one model against every layer of
another, exactly and with bounded memory (:func:`cka_matrix`).

Row matrices ``(n, d)``, one row per aligned token; layers centred in float64; inputs are never
modified.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.errors import GraftError
from ..core.progress import Progress, silent


def centre(X: torch.Tensor) -> torch.Tensor:
    return X - X.mean(0, keepdim=True)


def cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA: ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), columns centred."""
    Xc, Yc = centre(X.double()), centre(Y.double())
    num = (Xc.T @ Yc).pow(2).sum()
    den = torch.linalg.matrix_norm(Xc.T @ Xc) * torch.linalg.matrix_norm(Yc.T @ Yc)
    return float(num / den) if den > 0 else 0.0


LINEAR = "linear"
DEBIASED = "debiased"


def choose_estimator(n: int, dx: int, dy: int) -> str:
    """Linear CKA when the rows are at least as many as the wider width; debiased CKA (from the
    unbiased HSIC estimator) when they are fewer, where linear CKA is biased upwards (with n <= d
    every centred Gram matrix is close to a scaled projection on the same n - 1 dimensional space,
    and two unrelated random models score high)."""
    return LINEAR if n >= max(dx, dy) or n < 4 else DEBIASED


def cka_matrix(
    Xs: torch.Tensor,
    Ys: torch.Tensor,
    progress: Optional[Progress] = None,
    gram_memory_bytes: float = 5e8,
    estimator: str = LINEAR,
    info: Optional[dict] = None,
) -> torch.Tensor:
    """CKA between every X layer and every Y layer. Xs: (Lx, n, dx), Ys: (Ly, n, dy) -> (Lx, Ly).

    Two exact forms, chosen by flop count (layers centred in float64, then held in float32):
    * Gram form: ||Xc^T Yc||_F^2 = <Xc Xc^T, Yc Yc^T>_F. The centred n x n Gram matrices are built
      in float32 block by block (rows in blocks; only blocks on or above the diagonal, the others counted
      twice by symmetry), and every block adds its Lx x Ly inner products and the squared norms
      at once (float32 products of 4,096 terms summed in float64 on a CPU, float64 products on
      CUDA, :func:`_dots`; a model against itself gets a diagonal of 1 to about 1e-7). About
      n^2 d / 2 flops per layer plus n^2 / 2 per pair; memory bounded by ``gram_memory_bytes``
      whatever n.
    * Feature form: one (dx x n) @ (n x dy) product per pair, all Y layers at once per X layer
      (n dx dy flops per pair; float32 products summed in float64 on a CPU, float64 on CUDA), for
      few layers, narrow models or very many rows.

    ``estimator = "debiased"``: CKA from the unbiased HSIC estimator (Song et al. 2012; Nguyen, Raghu
    and Kornblith 2021) instead of the plug-in one, from the same products plus each row's squared
    norm (:func:`_debias`). ``info`` (a dict) receives the estimator and the form that ran.
    """
    progress = progress or silent()
    Lx, n, dx = Xs.shape
    Ly, _, dy = Ys.shape
    Xc, Yc = _centred32(Xs), _centred32(Ys)
    block = _gram_block(n, Lx + Ly, gram_memory_bytes)
    nb = -(-n // block)
    sym = (nb + 1) / (2 * nb)  # share of the Gram entries computed
    gram_flops = ((Lx * dx + Ly * dy) * n * n + 2 * Lx * Ly * n * n) * sym
    feat_flops = (Lx * Ly * n * dx * dy + (Lx * dx * dx + Ly * dy * dy) * n) * (
        2 if Xc.is_cuda else 1
    )  # float64 on CUDA
    form = "gram" if gram_flops < feat_flops else "feature"
    if form == "gram":
        num, nx, ny = _gram_products(Xc, Yc, block, progress)
    else:
        num, nx, ny = _feature_products(Xc, Yc, progress)
    if info is not None:
        info.update(estimator=estimator, form=form)
    if estimator == DEBIASED:
        return _debias(Xc, Yc, num, nx, ny)
    return (num / (nx.sqrt().unsqueeze(1) * ny.sqrt().unsqueeze(0)).clamp_min(1e-300)).clamp(0.0, 1.0)


def _debias(Xc: torch.Tensor, Yc: torch.Tensor, num: torch.Tensor, nx: torch.Tensor, ny: torch.Tensor):
    """Debiased CKA from the centred products: HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L)) with

        HSIC_1 = [tr(K~ L~) + (1' K~ 1)(1' L~ 1) / ((n-1)(n-2)) - 2 / (n-2) 1' K~ L~ 1] / (n (n-3)),

    K~ = K with its diagonal set to 0. The estimator does not change when the rows are centred, and
    for centred rows K 1 = 0, so with k_i = ||x_i||^2 (K's diagonal): tr(K~ L~) = <K, L> - k.l,
    1' K~ 1 = -sum k, and 1' K~ L~ 1 = k.l. Values can fall slightly below 0 (unbiased), and a layer
    against itself gives 1. Needs n >= 4."""
    n = Xc.shape[1]
    k = _sq_norms(Xc.reshape(-1, Xc.shape[2])).view(Xc.shape[0], n)  # (Lx, n) float64
    lv = _sq_norms(Yc.reshape(-1, Yc.shape[2])).view(Yc.shape[0], n)
    a, b = (n - 1) * (n - 2), n - 2

    def hsic(dot: torch.Tensor, kl: torch.Tensor, sk: torch.Tensor, sl: torch.Tensor) -> torch.Tensor:
        return (dot - kl + sk * sl / a - 2.0 / b * kl) / (n * (n - 3))

    kl = k @ lv.T  # (Lx, Ly)
    hxy = hsic(num, kl, k.sum(1, keepdim=True), lv.sum(1).unsqueeze(0))
    hxx = hsic(nx, k.pow(2).sum(1), k.sum(1), k.sum(1))
    hyy = hsic(ny, lv.pow(2).sum(1), lv.sum(1), lv.sum(1))
    den = (hxx.clamp_min(0).sqrt().unsqueeze(1) * hyy.clamp_min(0).sqrt().unsqueeze(0)).clamp_min(1e-300)
    return (hxy / den).clamp(-1.0, 1.0)


def _centred32(S: torch.Tensor) -> torch.Tensor:
    """Each layer centred over its rows (mean in float64), as float32. S: (L, n, d)."""
    out = torch.empty(S.shape, dtype=torch.float32, device=S.device)
    for l in range(S.shape[0]):
        out[l] = centre(S[l].double()).float()
    return out


def _gram_block(n: int, layers: int, memory_bytes: float) -> int:
    """Rows per Gram block: about a quarter of the rows (so symmetry saves ~3/8 of the work), at
    least 128, and small enough that one block pair of every layer (float32 + float64) fits."""
    by_memory = int((memory_bytes / (12 * max(layers, 1))) ** 0.5)
    return max(1, min(n, max(128, -(-n // 4)), by_memory))


def _gram_products(Xc: torch.Tensor, Yc: torch.Tensor, block: int, progress: Progress):
    """<Kx_i, Ky_j>, ||Kx_i||^2, ||Ky_j||^2 for the centred Gram matrices K = Z Z^T, block by block."""
    Lx, n, _ = Xc.shape
    Ly = Yc.shape[0]
    f64 = {"dtype": torch.float64, "device": Xc.device}
    num, nx, ny = torch.zeros(Lx, Ly, **f64), torch.zeros(Lx, **f64), torch.zeros(Ly, **f64)
    starts = list(range(0, n, block))
    pairs = [(a, c) for i, a in enumerate(starts) for c in starts[i:]]
    for k, (a, c) in enumerate(pairs):
        progress(k / len(pairs), "CKA: Gram blocks")
        w = 1.0 if a == c else 2.0  # an off-diagonal block stands for itself and its transpose
        KX = torch.bmm(Xc[:, a : a + block], Xc[:, c : c + block].transpose(1, 2)).reshape(Lx, -1)
        KY = torch.bmm(Yc[:, a : a + block], Yc[:, c : c + block].transpose(1, 2)).reshape(Ly, -1)
        num += w * _dots(KX, KY)
        nx += w * _sq_norms(KX)
        ny += w * _sq_norms(KY)
    return num, nx, ny


def _dots(A: torch.Tensor, B: torch.Tensor, chunk: int = 4096, wide: Optional[bool] = None) -> torch.Tensor:
    """A @ B^T for float32 A (m, k), B (p, k), in float64.

    On a CPU: float32 products over column chunks of ``chunk``, summed in float64 (so rounding stays
    that of a few thousand float32 terms, about 1e-7 relative, at any k, without converting the
    Gram blocks to float64). On CUDA (``wide``): one float64 product, since a loop of chunks is
    launch-bound there and a GPU's float32 sums of 4,096 terms round at about 1e-6, which a model
    against itself would see on CKA's diagonal."""
    if A.is_cuda if wide is None else wide:
        return A.double() @ B.double().T
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=A.device)
    for c in range(0, A.shape[1], chunk):
        out += (A[:, c : c + chunk] @ B[:, c : c + chunk].T).double()
    return out


def _sq_norms(A: torch.Tensor, chunk: int = 4096, wide: Optional[bool] = None) -> torch.Tensor:
    """Squared norm of every row of float32 A (m, k) in float64: float32 sums over column chunks on a
    CPU, float64 throughout on CUDA (``wide``), as :func:`_dots`."""
    if A.is_cuda if wide is None else wide:
        return A.double().pow(2).sum(1)
    out = torch.zeros(A.shape[0], dtype=torch.float64, device=A.device)
    for c in range(0, A.shape[1], chunk):
        out += A[:, c : c + chunk].pow(2).sum(1).double()
    return out


def _feature_products(Xc: torch.Tensor, Yc: torch.Tensor, progress: Progress, chunk: int = 2048):
    """||Xc_i^T Yc_j||^2, ||Xc_i^T Xc_i||^2, ||Yc_j^T Yc_j||^2 in float64: sums over row chunks of
    ``chunk`` (which bound the memory) of float32 products on a CPU, as :func:`_dots`, and of float64
    products on CUDA."""
    Lx, n, _ = Xc.shape
    wide = Xc.is_cuda

    def cov(
        A: torch.Tensor, B: torch.Tensor
    ) -> torch.Tensor:  # A: (n, da) or (L, n, da), B: (L, n, db) -> (L, da, db)
        out = None
        for r in range(0, n, chunk):
            a, b = A[..., r : r + chunk, :].transpose(-2, -1), B[:, r : r + chunk]
            part = torch.matmul(a.double(), b.double()) if wide else torch.matmul(a, b).double()
            out = part if out is None else out + part
        return out

    nx, ny = cov(Xc, Xc).pow(2).sum(dim=(1, 2)), cov(Yc, Yc).pow(2).sum(dim=(1, 2))
    num = torch.empty(Lx, Yc.shape[0], dtype=torch.float64, device=Xc.device)
    for i in range(Lx):
        progress(i / Lx, "CKA: cross-covariances")
        num[i] = cov(Xc[i], Yc).pow(2).sum(dim=(1, 2))
    return num, nx, ny


MINIBATCH = "minibatch"
MINIBATCH_ROWS = 512  # rows per minibatch of the minibatch estimator


def minibatch_grams(R: torch.Tensor, parts: list[torch.Tensor], out: list[torch.Tensor], layer: int) -> None:
    """One layer's Gram matrix per minibatch, for :func:`minibatch_cka`: the rows ``R`` (n, d)
    centred over all rows (mean in float64; the unbiased HSIC does not change under a shift, the
    centring only keeps float32 products accurate), then ``out[k][layer] = R_k R_k^T`` for the rows
    ``parts[k]`` of minibatch k (float32 products summed in float64 over column chunks, then
    stored in float32)."""
    Rc = centre(R.double()).float()
    for k, idx in enumerate(parts):
        B = Rc.index_select(0, idx.to(Rc.device))
        out[k][layer] = _dots(B, B).float()


def minibatch_cka(
    grams_x: list[torch.Tensor],
    grams_y: list[torch.Tensor],
    keep: list[torch.Tensor],
    progress: Optional[Progress] = None,
) -> torch.Tensor:
    """CKA from the unbiased HSIC averaged over minibatches (Nguyen, Raghu and Kornblith 2021):

        CKA_mb(X_i, Y_j) = sum_k HSIC_1(K_ik, L_jk) / sqrt(sum_k HSIC_1(K_ik, K_ik) sum_k HSIC_1(L_jk, L_jk))

    ``grams_x[k]``: (Lx, m_k, m_k), every X layer's Gram matrix on minibatch k (the same rows for
    every layer and for Y); ``keep[k]``: (m_k,) bool, the rows of the minibatch that count (massive
    activations left out afterwards drop their row and column). Memory is the Gram matrices, n x b
    per layer, not the n x d rows; each minibatch needs 4 kept rows. With one minibatch of every row
    this is :func:`cka_matrix`'s debiased CKA."""
    progress = progress or silent()
    Lx, Ly = grams_x[0].shape[0], grams_y[0].shape[0]
    f64 = {"dtype": torch.float64}
    hxy, hxx, hyy = torch.zeros(Lx, Ly, **f64), torch.zeros(Lx, **f64), torch.zeros(Ly, **f64)
    used = 0
    for k, (GX, GY, kp) in enumerate(zip(grams_x, grams_y, keep)):
        progress(k / len(grams_x), "CKA: minibatches")
        m = int(kp.sum())
        if m < 4:
            continue
        used += 1
        if not bool(kp.all()):
            at = kp.nonzero().squeeze(1)
            GX = GX.index_select(1, at).index_select(2, at)
            GY = GY.index_select(1, at).index_select(2, at)
        KX, KY = GX.clone(), GY.clone()
        KX.diagonal(dim1=1, dim2=2).zero_()
        KY.diagonal(dim1=1, dim2=2).zero_()
        ux, uy = KX.sum(2, dtype=torch.float64), KY.sum(2, dtype=torch.float64)  # K~ 1, (L, m)
        sx, sy = ux.sum(1), uy.sum(1)  # 1' K~ 1
        a, b, c = (m - 1) * (m - 2), m - 2, m * (m - 3)
        KXf, KYf = KX.reshape(Lx, -1), KY.reshape(Ly, -1)
        hxy += (_dots(KXf, KYf) + sx.unsqueeze(1) * sy.unsqueeze(0) / a - 2.0 / b * (ux @ uy.T)) / c
        hxx += (_sq_norms(KXf) + sx * sx / a - 2.0 / b * ux.pow(2).sum(1)) / c
        hyy += (_sq_norms(KYf) + sy * sy / a - 2.0 / b * uy.pow(2).sum(1)) / c
    if used == 0:
        raise GraftError("too few rows per minibatch for the minibatch CKA (4 kept rows needed)")
    den = (hxx.clamp_min(0).sqrt().unsqueeze(1) * hyy.clamp_min(0).sqrt().unsqueeze(0)).clamp_min(1e-300)
    return (hxy / den).clamp(-1.0, 1.0)


def minibatch_parts(n: int, rows: int = MINIBATCH_ROWS, seed: int = 0) -> list[torch.Tensor]:
    """The minibatches of :func:`minibatch_cka`: a seeded permutation of the n rows (neighbouring
    tokens of one text are alike, so a minibatch of consecutive rows would be one text's), cut
    into ceil(n / rows) parts of equal size to one row."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    k = max(1, -(-n // max(4, rows)))
    return [p.clone() for p in torch.tensor_split(perm, k)]
