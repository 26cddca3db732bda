"""Low-rank weight deltas as factors: :class:`ModuleDelta` and the linear algebra on its factors.

Everything Model Surgery stage 1 (T5 concept cartography, T6 spectrum and rank-k) and the
rank-k conjugation transplant need is a list of :class:`ModuleDelta`: per linear module of a
block, factors ``B`` (out x r) and ``A`` (r x in) with ``dW = B @ A`` in the ``nn.Linear``
orientation ``(out, in)`` and any LoRA scale already folded into ``B``.

Deltas come from a PEFT LoRA adapter (:mod:`engine.adapters.lora` finds it,
:mod:`engine.adapters.lora_factors`
reads its factors) or from a full fine-tune against its base (:mod:`engine.adapters.finetune_delta`).

Linear algebra
--------------
* :func:`factored_svd` is the exact thin SVD of ``B @ A`` from the factors alone: QR of ``B`` and
  of ``A^T``, SVD of the small ``r x r`` core (float64 inside). Cost ``O((m + n) r^2)`` instead
  of ``O(m n min(m, n))`` for a dense SVD.
* :func:`truncate` gives the best rank-k factors (Eckart-Young), :func:`effective_rank` the
  exponential of the entropy of the normalised squared singular values (Roy & Vetterli 2007),
  :func:`k_at_energy` the smallest k whose cumulative squared-singular-value share reaches a
  threshold.
* :func:`randomized_svd` is a truncated SVD of a dense matrix by randomized subspace iteration
  (full fine-tunes, :mod:`engine.adapters.finetune_delta`).

Graft's choices (recorded in docs/methods.md)
--------------------------------------------------------
* **Energy** of a module is ``||dW||_F`` (docs/methods.md); **shares** are of the *squared* norm,
  ``||dW_i||_F^2 / sum_j ||dW_j||_F^2``, because squared Frobenius norms add up over modules
  (they are sums of squared parameter changes) while plain norms do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from ..core.errors import GraftError

OVERSAMPLE = 8
POWER_ITERS = 4


@dataclass
class ModuleDelta:
    """``dW = B @ A`` of one linear module, ``(out, in)`` as ``nn.Linear.weight``.

    ``B`` carries the LoRA scale. ``frob_norm`` is the exact ``||dW||_F`` of the whole update when
    the factors are a truncation of it (full fine-tunes); ``None`` when ``B @ A`` *is* the update
    (adapters). Tensors may be shared with a cache: treat them as read-only.
    """

    name: str  # canonical, e.g. "blocks.3.attn.q"; the module path for modules outside blocks
    layer: int  # block index; -1 outside the blocks
    module: str  # canonical short name ("attn.q"); the in-block path when no layout knows it
    kind: str  # "attention" | "mlp" ("other" for modules outside the blocks or of unknown kind)
    B: torch.Tensor  # (out, r) float32, scale folded in
    A: torch.Tensor  # (r, in) float32
    frob_norm: Optional[float] = None  # exact ||dW||_F when B @ A is a truncation (full fine-tunes)
    source: str = ""  # where it came from: the adapter key prefix or the model's module path
    known: bool = True  # the module name was mapped to a canonical name
    scale: float = 1.0  # LoRA scale folded into B (1 for full fine-tunes)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    def dense(self) -> torch.Tensor:
        """``B @ A`` (out x in, float32): for tests and small modules; cartography never needs it."""
        return self.B @ self.A

    def norm_sq(self) -> float:
        """Exact ``||dW||_F^2`` of the whole update (``frob_norm`` when set, else from the factors:
        ``trace((B^T B)(A A^T))``, an r x r computation)."""
        if self.frob_norm is not None:
            return float(self.frob_norm) ** 2
        B, A = self.B.double(), self.A.double()
        return float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0.0))


def fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic signs: the largest-magnitude entry of every left singular vector is positive."""
    if U.numel() == 0:
        return U, Vh
    idx = U.abs().argmax(dim=0)
    s = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    s[s == 0] = 1
    return U * s, Vh * s[:, None]


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD ``B @ A = U diag(S) Vh`` from the factors, never forming ``B @ A``.

    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (reduced QR), so ``B A = Q_B (R_B R_A^T) Q_A^T`` and the
    SVD of the small core ``R_B R_A^T = U_c S V_c^T`` gives ``U = Q_B U_c``, ``Vh = V_c^T Q_A^T``.
    Computed in float64; returns float64 tensors, ``U`` (m x k), ``S`` (k, descending), ``Vh``
    (k x n) with ``k = min(r, m, n)``, signs fixed so the largest entry of each ``U`` column is
    positive (deterministic exports)."""
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise GraftError(f"factors do not multiply: B is {tuple(B.shape)}, A is {tuple(A.shape)}")
    B64, A64 = B.detach().to(torch.float64), A.detach().to(torch.float64)
    Qb, Rb = torch.linalg.qr(B64, mode="reduced")
    Qa, Ra = torch.linalg.qr(A64.T, mode="reduced")
    core = Rb @ Ra.T
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    U = Qb @ Uc
    Vh = Vch @ Qa.T
    U, Vh = fix_signs(U, Vh)
    return U, S, Vh


def truncate(delta: ModuleDelta, k: int) -> ModuleDelta:
    """The best rank-``k`` approximation of ``delta`` (Eckart-Young) as factors
    ``B_k = U_k diag(S_k)``, ``A_k = Vh_k`` (float32). ``k`` above the rank keeps every
    direction. ``frob_norm`` of the result is ``None``: its factors are exactly the truncated
    update it stands for."""
    if k < 1:
        raise GraftError(f"rank k must be at least 1, got {k}")
    U, S, Vh = factored_svd(delta.B, delta.A)
    k = min(int(k), int(S.numel()))
    return replace(
        delta,
        B=(U[:, :k] * S[:k]).to(torch.float32).contiguous(),
        A=Vh[:k].to(torch.float32).contiguous(),
        frob_norm=None,
    )


def effective_rank(S: Any) -> float:
    """``exp(H(p))`` with ``p_i = s_i^2 / sum_j s_j^2`` and ``0 log 0 = 0`` (the entropy-based
    effective rank of Roy & Vetterli on the energy distribution): 1 for a rank-1 update, ``r``
    for ``r`` equal singular values. 0 for an all-zero spectrum (no update)."""
    s = torch.as_tensor(S, dtype=torch.float64).flatten()
    e = s * s
    total = float(e.sum())
    if not math.isfinite(total) or total <= 0.0:
        return 0.0
    p = e / total
    p = p[p > 0]
    return float(torch.exp(-(p * torch.log(p)).sum()))


def k_at_energy(S: Any, threshold: float, total: Optional[float] = None) -> Optional[int]:
    """Smallest ``k`` with ``sum_{i<=k} s_i^2 / total >= threshold`` (``threshold`` in (0, 1]).

    ``total`` defaults to ``sum s_i^2`` (then a ``k`` always exists). Pass the exact squared norm
    of the whole update when ``S`` is a truncated spectrum: ``None`` then means the threshold is not
    reached within ``len(S)`` directions. A relative tolerance of 1e-12 absorbs rounding (so a
    threshold of 1 gives the numerical rank). 0 for an all-zero spectrum."""
    if not (0.0 < float(threshold) <= 1.0):
        raise GraftError(f"energy threshold must be in (0, 1], got {threshold}")
    s = torch.as_tensor(S, dtype=torch.float64).flatten()
    e = s * s
    tot = float(e.sum()) if total is None else float(total)
    if tot <= 0.0 or not math.isfinite(tot):
        return 0
    cum = torch.cumsum(e, 0) / tot
    hit = torch.nonzero(cum >= float(threshold) - 1e-12)
    if hit.numel() == 0:
        return None if total is not None else int(s.numel())
    return int(hit[0, 0]) + 1


def cumulative_energy(S: Any, total: Optional[float] = None) -> list[float]:
    """``sum_{i<=k} s_i^2 / total`` for k = 1..len(S) (``total`` defaults to ``sum s_i^2``)."""
    s = torch.as_tensor(S, dtype=torch.float64).flatten()
    e = s * s
    tot = float(e.sum()) if total is None else float(total)
    if tot <= 0.0:
        return [0.0] * int(s.numel())
    return [min(1.0, float(v)) for v in torch.cumsum(e, 0) / tot]


def randomized_svd(
    M: torch.Tensor,
    rank: int,
    *,
    oversample: int = OVERSAMPLE,
    niter: int = POWER_ITERS,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``M`` (top ``rank`` triplets) by randomized subspace iteration (Halko et
    al. 2011, Alg. 4.4). Small matrices (smaller side <= rank + oversample) get an exact SVD. Uses
    ``M``'s dtype and device; deterministic for a given generator state."""
    m, n = M.shape
    q = min(rank + oversample, m, n)
    if min(m, n) <= rank + oversample:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    G = torch.randn(n, q, generator=generator, dtype=M.dtype, device="cpu").to(M.device)
    Q, _ = torch.linalg.qr(M @ G)
    for _ in range(niter):
        Z, _ = torch.linalg.qr(M.T @ Q)
        Q, _ = torch.linalg.qr(M @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    U = Q @ Ub
    return U[:, :rank], S[:rank], Vh[:rank]
