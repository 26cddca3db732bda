"""What the rank-k conjugation tool and the rebuild of its T' share: the donor's update as factors
(:func:`update_deltas`: a LoRA adapter's, or a full fine-tune's truncated SVD), that update merged
into a working copy of its base (:func:`merged_donor`), and the run's plan of maps
(:func:`conjugation_plan`), deterministic for the same inputs, parameters and workload. ``params``
is the tool's parameters (``engine.tools.conjugate.ConjugateParams``)."""

from __future__ import annotations

from typing import Any

import torch

from ..core.progress import Progress
from ..loading.models import LoadedModel
from ..measure.budget import budget_texts, per_text_limit
from ..surgery.conjugate import ConjugationPlan
from ..surgery.conjugate_plan import plan_conjugation
from ..surgery.reversible import working_copy
from .context import ToolContext


def merged_donor(base: LoadedModel, deltas: list) -> torch.nn.Module:
    """The update applied to its own base, in memory: a working copy sharing every tensor of the
    base except the updated weights (added in float64, rounded once)."""
    mods = {m.name: m for m in base.arch.linear_modules()}
    touched = [base.arch.module(mods[d.name].path).weight for d in deltas if d.name in mods]
    model = working_copy(base, touched)
    with torch.no_grad():
        for d in deltas:
            lm = mods.get(d.name)
            if lm is None:
                continue
            w = dict(model.named_modules())[lm.path].weight
            upd = d.B.double() @ d.A.double()
            if lm.conv1d:
                upd = upd.T
            w.copy_((w.double() + upd.to(w.device)).to(w.dtype))
    return model


def update_deltas(
    ctx: ToolContext, params: Any, progress: Progress
) -> tuple[list, dict[str, Any], list[str]]:
    from ..adapters.finetune_delta import finetune_deltas
    from ..adapters.lora import resolve_adapter
    from ..adapters.lora_factors import adapter_deltas, check_against_model

    base = ctx.base
    assert base is not None
    if ctx.adapter is not None:
        ref = resolve_adapter(ctx.adapter)
        deltas = adapter_deltas(ref, n_layers=base.arch.n_layers)
        warnings = check_against_model(deltas, base)
        return deltas, {"kind": "adapter", **ref.describe()}, warnings
    assert ctx.donor is not None
    deltas = finetune_deltas(ctx.donor, base, params.rank, progress=progress, seed=params.seed)
    return deltas, {"kind": "full fine-tune", "donor": ctx.donor.spec.ref, "rank": params.rank}, []


def conjugation_plan(ctx: ToolContext, params: Any, deltas: list, progress: Progress) -> ConjugationPlan:
    """The run's plan: every map fitted on the workload's texts (deterministic for the same inputs,
    parameters and workload, so a finished run's T' can be rebuilt: engine/running/rebuild.py)."""
    base, target = ctx.base, ctx.target
    assert base is not None and target is not None and ctx.workload is not None
    texts = budget_texts(
        ctx.workload.texts,
        [base.tokenizer, target.tokenizer],
        ctx.options.max_tokens,
        per_text=per_text_limit([base, target]),
    )
    return plan_conjugation(
        base,
        target,
        deltas,
        texts,
        k=params.k,
        energy=params.energy or None,
        ridge_alpha=params.ridge_alpha,
        heldout_fraction=params.heldout_fraction,
        seed=params.seed,
        outlier_factor=ctx.options.outlier_factor,
        force=params.map,
        batch_size=ctx.options.batch_size,
        captures=ctx.captures,
        progress=progress,
    )
