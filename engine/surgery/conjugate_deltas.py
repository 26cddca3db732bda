"""Stage 1 of planning a rank-k conjugation (:mod:`engine.surgery.conjugate_plan`): every module
delta checked against the base's weight and truncated to rank ``k`` (or to the smallest rank
reaching an ``energy`` share of ``||dW||_F^2``), from its factors, never the dense product."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from ..core.errors import GraftError
from ..loading.models import LoadedModel
from .conjugate import ModulePlan

if TYPE_CHECKING:  # pragma: no cover
    from ..adapters.lowrank import ModuleDelta


def fro_factored(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B A||_F from the factors: sqrt(tr((B^T B)(A A^T)))."""
    Bd, Ad = B.double(), A.double()
    return math.sqrt(max(float(((Bd.T @ Bd) * (Ad @ Ad.T)).sum()), 0.0))


def _truncate(delta: "ModuleDelta", k: int, energy: Optional[float]) -> tuple["ModuleDelta", int, int, float]:
    """(truncated delta, its rank, k kept, energy kept). Energy is the share of the exact
    ``||dW||_F^2`` (:meth:`engine.adapters.lowrank.ModuleDelta.norm_sq`: a full fine-tune's factors may
    already be
    a truncation of it). A zero update keeps k = 0."""
    rank = int(delta.rank)
    total = float(delta.norm_sq())
    if not (total > 0 and math.isfinite(total)):
        return delta, rank, 0, 0.0
    if (k <= 0 or k >= rank) and not energy:
        return delta, rank, rank, min(1.0, fro_factored(delta.B, delta.A) ** 2 / total)
    from ..adapters.lowrank import factored_svd, k_at_energy, truncate

    _, S, _ = factored_svd(delta.B, delta.A)
    S2 = S.double().pow(2)
    kk = len(S) if k <= 0 else min(k, len(S))
    if energy:
        ke = k_at_energy(S, energy, total=total if delta.frob_norm is not None else None)
        kk = min(kk, len(S) if ke is None else int(ke))
    if kk <= 0:
        return delta, rank, 0, 0.0
    return truncate(delta, kk), rank, kk, min(1.0, float(S2[:kk].sum()) / total)


def validate_and_truncate(
    deltas: Sequence["ModuleDelta"], base: LoadedModel, k: int, energy: Optional[float]
) -> tuple[list[ModulePlan], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Stage 1 of the plan: every delta checked against the base and truncated to rank ``k`` (or
    the ``energy`` share); returns the module plans and the kept factors by plan index."""
    bmods = {m.name: m for m in base.arch.linear_modules()}
    plans: list[ModulePlan] = []
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # index in plans -> (B_k, A_k)
    seen: set[str] = set()
    for d in deltas:
        if d.name in seen:
            raise GraftError(f"module {d.name} appears twice among the deltas")
        seen.add(d.name)
        bm = bmods.get(d.name)
        if bm is None or int(getattr(d, "layer", 0)) < 0 or not getattr(d, "known", True):
            # LoRA outside the blocks (lm_head, embeddings) or on a module no layout names.
            plans.append(
                ModulePlan(
                    name=d.name,
                    layer=int(getattr(d, "layer", -1)),
                    canonical=getattr(d, "module", d.name),
                    kind=getattr(d, "kind", "other"),
                    rank=int(d.B.shape[1]),
                    k=0,
                    energy_kept=0.0,
                    delta_norm=fro_factored(d.B, d.A),
                    reason=f"{d.name} is not a block linear module of the base {base.label}",
                )
            )
            continue
        out_b, in_b = bm.shape
        if (
            d.B.ndim != 2
            or d.A.ndim != 2
            or d.B.shape[0] != out_b
            or d.A.shape[1] != in_b
            or d.B.shape[1] != d.A.shape[0]
        ):
            raise GraftError(
                f"delta of {d.name} has factors {list(d.B.shape)} x {list(d.A.shape)}, "
                f"which do not make the base's ({out_b}, {in_b}) weight: wrong base model?"
            )
        if not (torch.isfinite(d.B).all() and torch.isfinite(d.A).all()):
            raise GraftError(f"delta of {d.name} has non-finite values")
        dk, rank, kk, kept = _truncate(d, k, energy)
        mp = ModulePlan(
            name=d.name,
            layer=bm.layer,
            canonical=bm.canonical,
            kind=bm.kind,
            rank=rank,
            k=kk,
            energy_kept=kept,
            delta_norm=fro_factored(dk.B, dk.A) if kk else 0.0,
        )
        if kk:
            factors[len(plans)] = (dk.B, dk.A)
        else:
            mp.reason = "the delta is zero"
        plans.append(mp)
    return plans, factors
