"""Organ insertion (docs/methods.md operation 2, NOT) with before/after evaluation.

The organ replaces the recipient's blocks ``p .. p+k-1`` (``direct``) or goes in between affine
bridges (``bridged``: closed form from the workload's texts, trained from the identity, or both,
:mod:`engine.surgery.organ_bridge`), optionally followed by recovery fine-tuning on the workload and
optionally composed with a second organ placed ``spacing`` blocks after the first. T and T' are
evaluated (perplexity on the concept facts and on the retained set, task score), and D (the
organ's source) when the organ is untrained and reads the same tokens. Without ``--save`` the CLI
rolls back before returning; the app keeps T' applied for one-click roll back and save, like a swap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from ..core.params import EvaluationSets, GreedyTokensParam, TaskScoreParam, param
from ..core.progress import Progress
from ..evaluation.beforeafter import load_sets, rnd
from ..loading.tokens import same_tokenizer
from ..running.context import ToolContext
from ..running.organ_run import (
    BRIDGE_KIND,
    STRATEGIES,
    InsertionParams,
    evaluate_insertion,
    evaluate_target,
    insert_and_prepare,
    legacy_params,
    load_source,
    organ_of,
    require_source,
    short,
    strategy_configs,
    strategy_mode,
    train_texts_of,
    training_card,
    training_texts,
)
from ..running.rebuild import Rebuilt, as_dmodel, register_rebuilder
from ..running.registry import Tool, register
from ..surgery.organ import load_organ
from ..surgery.organ_surgery import Placement


@dataclass(frozen=True)
class OrganInsertParams(InsertionParams, EvaluationSets, TaskScoreParam, GreedyTokensParam):
    position: int = param(
        -1,
        "Recipient block p where the organ's first block goes; -1 = the organ's own start s.",
        min=-1,
        max=100_000,
    )
    second_organ: str = param(
        "", "Optional second organ checkpoint folder, placed after the first (multi-organ composition)."
    )
    spacing: int = param(
        0, "Blocks between the first organ's last block and the second organ's first.", min=0, max=100_000
    )
    save: str = param(
        "",
        "Save T' into this folder (Hugging Face format + surgery.json, + bridges.safetensors when "
        "bridged). Empty = don't save.",
        path="out_dir",
    )


@dataclass
class OrganInsertResult:
    mode: str
    bridge: Optional[str]  # "trained" (from the identity) | "closed-form (training-free)" | None (direct)
    strategy: str
    position: int
    placements: list[dict[str, Any]]  # organ, source, layers, position, mode, bridge_deviation
    before: dict[str, Optional[float]]  # T: ppl_concept, ppl_retained, task_score
    after: dict[str, Optional[float]]  # T'
    donor: Optional[dict[str, Optional[float]]]  # D = the organ's source, when meaningful
    donor_note: str
    bridge_deviation: Optional[dict[str, float]]  # first placement's {in, out}; None for direct
    bridge_losses: list[float]
    recovery_losses: list[float]
    organ_bytes: int
    extra_bytes: int  # held by T' beyond the cached T
    weight_hash_before: str
    weight_hash_after: str
    rollback_bit_exact: bool
    target_untouched: bool
    saved_to: Optional[str]
    card: dict[str, Any]
    live_id: Optional[str]


def _organs(ctx: ToolContext, params: OrganInsertParams) -> list[Any]:
    """The run's organ (checked against the recipient) and the optional second one."""
    return [organ_of(ctx, bridged=strategy_mode(params.strategy) == "bridged")] + (
        [load_organ(params.second_organ)] if params.second_organ.strip() else []
    )


def _sources(ctx: ToolContext, params: OrganInsertParams, organs: list[Any], progress: Progress) -> list[Any]:
    """Each organ's source model: required when bridged (the bridges read its stream), else optional."""
    out = []
    for i, o in enumerate(organs):
        p = progress.sub(i / len(organs), (i + 1) / len(organs))
        bridged = strategy_mode(params.strategy) == "bridged"
        out.append(require_source(ctx, o, p) if bridged else load_source(ctx, o, p)[0])
    return out


def _insert(
    ctx: ToolContext,
    params: OrganInsertParams,
    placements: list[Placement],
    sources: list[Any],
    texts: list[str],
    progress: Progress,
) -> tuple[Any, dict[str, Any]]:
    return insert_and_prepare(
        ctx,
        placements,
        sources,
        strategy=params.strategy,
        ridge_alpha=params.ridge_alpha,
        seed=params.seed,
        texts=texts,
        progress=progress,
        **strategy_configs(params),
    )


def compute_organ_insert(
    ctx: ToolContext, params: OrganInsertParams, progress: Progress
) -> OrganInsertResult:
    organs = _organs(ctx, params)
    organ = organs[0]
    sets = load_sets(params.concept, params.retained)
    p0 = organ.start if params.position < 0 else params.position
    positions = [p0] + ([p0 + organ.size + params.spacing] if len(organs) > 1 else [])
    mode = strategy_mode(params.strategy)
    placements = [Placement(o, p, mode) for o, p in zip(organs, positions)]
    sources = _sources(ctx, params, organs, progress.sub(0, 0.05))
    texts, train_data = train_texts_of(ctx, params.train_texts)
    progress(0.05, "evaluating the target T")
    ev_t = evaluate_target(ctx.target, sets, params.score, params.max_new_tokens, progress.sub(0.05, 0.2))
    src = sources[0]
    donor, donor_note = None, ""
    if src is None:
        donor_note = f"the organ's source {organ.source_ref} could not be loaded"
    elif organ.card.get("training"):
        donor_note = "the organ was trained standalone: its source model is not what the organ computes"
    elif not same_tokenizer(src.tokenizer, ctx.target.tokenizer):
        donor_note = "the source reads other tokens than the recipient"
    else:
        donor = short(evaluate_target(src, sets, params.score, params.max_new_tokens, progress.sub(0.2, 0.3)))
    progress(0.3, f"inserting at block {p0} ({params.strategy})")
    ins, log = _insert(ctx, params, placements, sources, texts, progress.sub(0.3, 0.6))
    hash_t, hash_tp = ins.hash_before(), ins.weight_hash()
    progress(0.6, "evaluating T'")
    ev_tp = evaluate_insertion(ins, sets, params.score, params.max_new_tokens, progress.sub(0.6, 0.85))
    devs = ins.deviations()
    rows = [
        {
            "organ": str(o.path),
            "source": o.source_ref,
            "layers": o.card["layers"],
            "size": o.size,
            "trained": bool(o.card.get("training")),
            "position": p,
            "mode": mode,
            "bridge_deviation": None if d is None else {k: rnd(v) for k, v in d.items()},
        }
        for o, p, d in zip(organs, positions, devs)
    ]
    before, after = short(ev_t), short(ev_tp)
    card = {
        "operation": "organ-transplant",
        "target": ctx.target.spec.ref,
        "donor": organ.source_ref,
        "placements": rows,
        "parameters": {
            k: getattr(params, k)
            for k in (
                "strategy",
                "ridge_alpha",
                "recovery_epochs",
                "bridge_epochs",
                "joint_epochs",
                "seed",
                "spacing",
                "score",
            )  # fmt: skip
        }
        | {
            "strategy_means": STRATEGIES[params.strategy],
            "training": training_card(params, len(texts), train_data),
        }
        | {
            "concept": {"name": sets[0].name, "sha256": sets[0].sha256},
            "retained": {"name": sets[1].name, "sha256": sets[1].sha256},
            "workload": {"name": ctx.workload.name, "sha256": ctx.workload.sha256},
        },
        "organs": [
            {"path": str(o.path), "tensors_sha256": o.sha256(), "layers": o.card["layers"]} for o in organs
        ],
        "results": {"before": before, "after": after, "donor": donor},
        "hashes": {"target": hash_t, "transplanted": hash_tp, "bridges_sha256": ins.bridges_sha256()},
        "trust_remote_code": bool(ctx.target.spec.trust_remote_code),
    }
    saved_to = None
    if params.save.strip():
        progress(0.88, f"saving T' to {params.save}")
        saved_to = str(ins.save_card(params.save, card))
    extra = ins.extra_bytes()
    progress(0.95, "rolling back and verifying")
    t0 = time.perf_counter()
    ins.rollback()
    rollback_s = time.perf_counter() - t0
    exact = ins.matches_target()
    untouched = ctx.target.state_hash() == hash_t
    ctx.meta["seconds_insert"] = round(log["insert_seconds"], 4)  # timings vary run to run: meta, not result
    ctx.meta["seconds_rollback"] = round(rollback_s, 4)
    ctx.meta["seconds_train"] = round(log["train_seconds"], 2)
    progress(1.0, "done")  # the last cancel point: a cancelled run keeps nothing in memory
    live_id = ctx.live.keep_reapplied(ins, card) if ctx.live is not None and exact else None
    return OrganInsertResult(
        mode=mode,
        bridge=BRIDGE_KIND.get(params.strategy),
        strategy=params.strategy,
        position=p0,
        placements=rows,
        before=before,
        after=after,
        donor=donor,
        donor_note=donor_note,
        bridge_deviation=rows[0]["bridge_deviation"],
        bridge_losses=[rnd(x) for x in log["bridge_losses"]],
        recovery_losses=[rnd(x) for x in log["recovery_losses"]],
        organ_bytes=sum(o.nbytes for o in organs),
        extra_bytes=extra,
        weight_hash_before=hash_t,
        weight_hash_after=hash_tp,
        rollback_bit_exact=bool(exact),
        target_untouched=bool(untouched),
        saved_to=saved_to,
        card=card,
        live_id=live_id,
    )


TOOL = register(
    Tool(
        name="organ-insert",
        code="OP2.3",
        title="Organ insertion + before/after evaluation",
        summary="Puts an organ into the target at block p by a strategy (direct, direct + recovery, "
        "bridged with trained bridges, closed-form bridges, or the no-organ control), with an optional "
        "second organ; evaluates T and T', rolls back bit-exactly, optionally saves T'.",
        params_cls=OrganInsertParams,
        compute=compute_organ_insert,
        figure="viz.organs:insert_figure",
        page="Organs",
        same_family=True,
        needs=(("organ", "target"),),
        run_label="Insert organ",
    )
)


def rebuild_organ_insert(envelope: dict[str, Any], store: Any, device: Optional[str] = None) -> Rebuilt:
    """An organ-insertion run: the same organ(s) put at the same position(s) of the same target
    again, bridges fitted / trained and recovery run on the run's workload (checked by its sha256),
    then T' checked against the run's weight hash (refused and rolled back when it differs)."""
    from ..core.data import resolve_workload
    from ..core.errors import GraftError
    from ..core.params import RunOptions, build_params
    from ..core.progress import silent
    from ..loading.models import ModelSpec

    result, meta = envelope.get("result") or {}, envelope.get("meta") or {}
    card = result.get("card") or {}
    opts = meta.get("options") or {}
    options = build_params(RunOptions, {**opts, "device": device or opts.get("device", "auto")})
    params = build_params(OrganInsertParams, {**legacy_params(meta.get("params") or {}), "save": ""})
    workload = resolve_workload(options.workload)
    if (meta.get("workload") or {}).get("sha256") not in (None, workload.sha256):
        raise GraftError(
            f"the workload {workload.name} has changed since this run (sha256 differs); insert the organ "
            "again"
        )
    target = store.get(
        ModelSpec.parse(envelope["target"], trust_remote_code=bool(card.get("trust_remote_code"))),
        options.device,
        options.dtype,
    )
    if result.get("weight_hash_before") and target.state_hash() != result["weight_hash_before"]:
        raise GraftError(
            f"the target {target.label} has changed since this run (weight hash differs); insert the organ "
            "again"
        )
    ctx = ToolContext(None, target, workload, options, organ=envelope.get("organ"), store=store)
    organs = _organs(ctx, params)
    for o, recorded in zip(organs, card.get("organs") or []):
        if o.sha256() != recorded.get("tensors_sha256"):
            raise GraftError(
                f"the organ {o.path} has changed since this run (tensors sha256 differs); insert it again"
            )
    positions = [row["position"] for row in result.get("placements") or []]
    placements = [Placement(o, p, strategy_mode(params.strategy)) for o, p in zip(organs, positions)]
    sources = _sources(ctx, params, organs, silent())
    texts = training_texts(params.train_texts)[0] if params.train_texts.strip() else list(workload.texts)
    ins, _ = _insert(ctx, params, placements, sources, texts, silent())
    if result.get("weight_hash_after") and ins.weight_hash() != result["weight_hash_after"]:
        ins.rollback()
        raise GraftError(
            "inserting the run's organ again does not reproduce its T' (weight hash differs: did the "
            "organ's source, the workload or the training change?)"
        )
    src = sources[0]
    donor = (
        as_dmodel(src)
        if src is not None
        and not organs[0].card.get("training")
        and same_tokenizer(src.tokenizer, target.tokenizer)
        else None
    )
    return Rebuilt(
        target,
        ins.working,
        donor,
        ins.rollback,
        ins,
        {
            "kind": "run",
            "run_id": envelope.get("run_id"),
            "tool": envelope.get("tool"),
            "operation": f"organ transplant ({params.strategy})",
            "donor": organs[0].source_ref,
            "target": envelope.get("target"),
            "modules": [f"blocks {p}..{p + o.size - 1}" for o, p in zip(organs, positions)],
            "weight_hash_before": ins.hash_before(),
            "weight_hash_after": ins.weight_hash(),
        },
    )


register_rebuilder(TOOL.name, rebuild_organ_insert)
