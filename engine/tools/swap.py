"""T11 ``swap``. Swap the top-K (or the named) modules from D into a working copy of T
(:class:`engine.surgery.transplant.ModuleSwap`, never touching the cached target), evaluate T, T' and D
(:func:`engine.evaluation.evalcache.evaluate_model`), report TIR = S(T')/S(T) and
Recovery = (S(T') - S(T)) / (S(D) - S(T)) with their undefined cases, the alignment score of T
and T' against D, generations side by side, weight hashes, and verify a bit-exact rollback.

Cross-family pairs, or pairs with different tokenizers, are refused with one line
(:func:`engine.surgery.transplant.check_swap_pair`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..core.params import EvaluationSets, GreedyTokensParam, TaskScoreParam, param
from ..core.progress import Progress
from ..evaluation.beforeafter import (
    evaluate_shared,
    load_sets,
    locked,
    metrics,
    rnd,
    side_by_side,
    transfer_scores,
)
from ..evaluation.evalcache import SCORES, alignment_score, evaluate_model
from ..running.context import ToolContext
from ..running.module_choice import choose_modules
from ..running.registry import Tool, register
from ..running.stream_surgery import (
    alignment_streamed,
    evaluate_streamed,
    need_save,
    open_saved,
    stage_folder,
    swap_values,
    update_card,
)
from ..surgery.transplant import ModuleSwap, check_swap_pair, save_transplant, swappable_modules


@dataclass(frozen=True)
class SwapParams(EvaluationSets, TaskScoreParam, GreedyTokensParam):
    k: int = param(
        8, "Swap the top-K modules of the T7 ranking (ignored when --modules is given).", min=1, max=100_000
    )
    modules: str = param(
        "",
        "Comma-separated module names to swap instead of the top K, e.g. "
        "'blocks.3.attn.o,blocks.5.mlp.down'.",
    )
    save: str = param(
        "",
        "Save T' into this folder (Hugging Face format + surgery.json). Empty = don't save.",
        path="out_dir",
    )


@dataclass
class SwapResult:
    modules: list[dict[str, Any]]  # swapped: name, layer, kind, score (None for hand-picked)
    selection: str  # "top-k" | "explicit"
    k: int
    score_kind: str
    before: dict[str, Optional[float]]  # T
    after: dict[str, Optional[float]]  # T'
    donor: dict[str, Optional[float]]  # D
    tir: Optional[float]
    recovery: Optional[float]
    tir_status: str
    recovery_status: str
    tir_note: str
    recovery_note: str
    alignment_before: Optional[float]  # greedy next-token agreement with D on the test questions
    alignment_after: Optional[float]
    generations: list[dict[str, Any]]  # per test question: T, T', D answers and which are correct
    n_test_items: int
    n_swappable: int
    n_tensors: int
    swapped_bytes: int
    weight_hash_before: str
    weight_hash_after: str
    rollback_bit_exact: bool
    target_untouched: bool
    saved_to: Optional[str]
    transfer: dict[
        str, dict[str, Any]
    ]  # TIR / Recovery (+ status, note) under each score kind: graded, exact
    card: dict[str, Any]  # the surgery card saved with T' (operation, models, parameters, results, hashes)
    live_id: Optional[
        str
    ]  # app only: T' is kept applied under this id (engine/running/live.py); None from the CLI
    route: str = "whole"  # "whole": both models in memory; "streamed": T' edited on disk, read by block
    saved_files: Optional[dict[str, Any]] = None  # streamed: tensors and bytes written, copied, linked


def compute_swap(ctx: ToolContext, params: SwapParams, progress: Progress) -> SwapResult:
    check_swap_pair(ctx.donor, ctx.target)
    sets = load_sets(params.concept, params.retained)
    if ctx.target.streamed:
        need_save(params.save, "T11")
    swappable, _ = swappable_modules(ctx.donor, ctx.target)
    chosen, explicit = choose_modules(ctx, params.k, params.modules, progress.sub(0, 0.25))
    swap = ModuleSwap(ctx.target, ctx.donor, [m["name"] for m in chosen])
    for row, n in zip(chosen, swap.modules):
        row.update(layer=swap.linear[n].layer, kind=swap.linear[n].kind)
    if ctx.target.streamed:
        return _swap_streamed(ctx, params, progress, swap, chosen, explicit, sets, len(swappable))

    test_q = [q.question for q in sets[0].test_qa()]
    hash_t = swap.hash_before()
    progress(0.3, "evaluating the target T")
    ev_t = evaluate_shared(
        ctx.target, sets, params.score, params.max_new_tokens, progress.sub(0.3, 0.45), hash_t
    )
    progress(0.45, "evaluating the donor D")
    ev_d = evaluate_shared(ctx.donor, sets, params.score, params.max_new_tokens, progress.sub(0.45, 0.6))

    progress(0.6, f"swapping {len(swap.modules)} modules into a working copy")
    swap.materialise()
    swap.apply()
    hash_tp = swap.weight_hash()
    ev_tp = evaluate_model(
        swap.working,
        ctx.target.tokenizer,
        sets[0],
        sets[1],
        score=params.score,
        max_new_tokens=params.max_new_tokens,
        state_hash=hash_tp,
        progress=progress.sub(0.62, 0.8),
    )
    progress(0.8, "alignment with the donor")
    with locked(ctx.donor, ctx.target):
        al_before = alignment_score(
            ctx.donor.model,
            ctx.donor.tokenizer,
            ctx.target.model,
            ctx.target.tokenizer,
            test_q,
            donor_hash=ev_d["state_hash"],
            state_hash=hash_t,
        )
        al_after = alignment_score(
            ctx.donor.model,
            ctx.donor.tokenizer,
            swap.working,
            ctx.target.tokenizer,
            test_q,
            donor_hash=ev_d["state_hash"],
            state_hash=hash_tp,
        )
    transfer = {
        kind: transfer_scores(
            ev_t[f"task_score_{kind}"], ev_tp[f"task_score_{kind}"], ev_d[f"task_score_{kind}"]
        )
        for kind in SCORES
    }
    tm = transfer[params.score]  # the run's own score kind (task_score is that kind's score)
    before, after, donor = metrics(ev_t), metrics(ev_tp), metrics(ev_d)

    card = {
        **_swap_card(ctx, params, swap.modules, sets),
        "results": _card_results(
            before, after, donor, tm, transfer, params.score, al_before["score"], al_after["score"]
        ),
        "hashes": {"target": hash_t, "transplanted": hash_tp, "donor": ev_d["state_hash"]},
    }
    saved_to = None
    if params.save.strip():
        progress(0.88, f"saving T' to {params.save}")
        saved_to = str(save_transplant(swap.working, ctx.target.tokenizer, params.save, card))

    progress(0.95, "rolling back and verifying")
    swap.rollback()
    bit_exact = swap.matches_target()
    untouched = ctx.target.state_hash() == hash_t
    progress(1.0, "done")  # the last cancel point: a cancelled run keeps nothing in memory
    live_id = ctx.live.keep_reapplied(swap, card) if ctx.live is not None and bit_exact else None
    return SwapResult(
        **_outcome(chosen, explicit, len(swap.modules), params.score, before, after, donor, tm),
        alignment_before=rnd(al_before["score"]),
        alignment_after=rnd(al_after["score"]),
        generations=side_by_side(ev_t, ev_tp, ev_d),
        n_test_items=ev_t["n_test_items"],
        n_swappable=len(swappable),
        n_tensors=swap.n_tensors,
        swapped_bytes=swap.swapped_bytes,
        weight_hash_before=hash_t,
        weight_hash_after=hash_tp,
        rollback_bit_exact=bool(bit_exact),
        target_untouched=bool(untouched),
        saved_to=saved_to,
        transfer=transfer,
        card=card,
        live_id=live_id,
    )


def _swap_card(ctx: ToolContext, params: SwapParams, modules: tuple[str, ...], sets: Any) -> dict[str, Any]:
    return {
        "operation": "module-swap",
        "donor": ctx.donor.spec.ref,
        "target": ctx.target.spec.ref,
        "modules": list(modules),
        "parameters": {
            "k": params.k,
            "modules": params.modules,
            "score": params.score,
            "max_new_tokens": params.max_new_tokens,
            "concept": {"name": sets[0].name, "sha256": sets[0].sha256},
            "retained": {"name": sets[1].name, "sha256": sets[1].sha256},
            "workload": {"name": ctx.workload.name, "sha256": ctx.workload.sha256},
        },
        "trust_remote_code": bool(ctx.donor.spec.trust_remote_code or ctx.target.spec.trust_remote_code),
    }


TRANSFER_FIELDS = ("tir", "recovery", "tir_status", "recovery_status", "tir_note", "recovery_note")


def _outcome(
    chosen: list, explicit: bool, k: int, score: str, before: dict, after: dict, donor: dict, tm: dict
) -> dict[str, Any]:
    """The fields of a :class:`SwapResult` both routes fill alike."""
    return {
        "modules": chosen,
        "selection": "explicit" if explicit else "top-k",
        "k": k,
        "score_kind": score,
        "before": before,
        "after": after,
        "donor": donor,
        **{f: tm[f] for f in TRANSFER_FIELDS},
    }


def _card_results(
    before: dict, after: dict, donor: dict, tm: dict, transfer: dict, score: str, al_b: Any, al_a: Any
) -> dict[str, Any]:
    return {
        "before": before,
        "after": after,
        "donor": donor,
        "tir": tm["tir"],
        "recovery": tm["recovery"],
        "tir_note": tm["tir_note"],
        "recovery_note": tm["recovery_note"],
        "score_kind": score,
        "transfer": transfer,
        "alignment_before": rnd(al_b),
        "alignment_after": rnd(al_a),
    }


def _swap_streamed(
    ctx: ToolContext,
    params: SwapParams,
    progress: Progress,
    swap: ModuleSwap,
    chosen: list[dict[str, Any]],
    explicit: bool,
    sets: Any,
    n_swappable: int,
) -> SwapResult:
    """T11 on a streamed pair: T' is staged as a folder (the donor's tensors read one at a time into
    copies of the target's shards), T, D and T' are evaluated block by block, and the folder is moved
    into place last (a cancel or failure before that leaves the destination as it was)."""
    target, donor = ctx.target, ctx.donor
    test_q = [q.question for q in sets[0].test_qa()]
    progress(0.3, "evaluating the target T (streamed)")
    ev_t = evaluate_streamed(target, sets, params.score, params.max_new_tokens, progress.sub(0.3, 0.45))
    progress(0.45, "evaluating the donor D (streamed)")
    ev_d = evaluate_streamed(donor, sets, params.score, params.max_new_tokens, progress.sub(0.45, 0.6))
    values = swap_values(swap, donor)
    card = {**_swap_card(ctx, params, swap.modules, sets), "route": "streamed"}
    edit, staged, untouched = stage_folder(target, params.save, values, card, progress.sub(0.6, 0.7))
    try:
        saved = open_saved(staged, target)
        progress(0.7, "evaluating T' from its folder (streamed)")
        ev_tp = evaluate_streamed(saved, sets, params.score, params.max_new_tokens, progress.sub(0.7, 0.85))
        progress(0.85, "alignment with the donor (streamed)")
        al_before = alignment_streamed(donor, target, test_q)
        al_after = alignment_streamed(donor, saved, test_q)
        scores = [{k: ev[f"task_score_{k}"] for k in SCORES} for ev in (ev_t, ev_tp, ev_d)]
        transfer = {k: transfer_scores(scores[0][k], scores[1][k], scores[2][k]) for k in SCORES}
        tm = transfer[params.score]
        before, after, d = metrics(ev_t), metrics(ev_tp), metrics(ev_d)
        card["results"] = _card_results(before, after, d, tm, transfer, params.score, al_before, al_after)
        card["hashes"] = {
            "target": ev_t["state_hash"],
            "transplanted": ev_tp["state_hash"],
            "donor": ev_d["state_hash"],
        }
        update_card(staged, {"results": card["results"], "hashes": card["hashes"]})
        progress(0.97, f"moving T' into place at {params.save}")
        folder = edit.commit()
    except BaseException:
        edit.abort()
        raise
    progress(1.0, "done")
    return SwapResult(
        **_outcome(chosen, explicit, len(swap.modules), params.score, before, after, d, tm),
        alignment_before=rnd(al_before),
        alignment_after=rnd(al_after),
        generations=side_by_side(ev_t, ev_tp, ev_d),
        n_test_items=ev_t["n_test_items"],
        n_swappable=n_swappable,
        n_tensors=len(values),
        swapped_bytes=sum(target.stream.index.entries[target.stream.keys[n]].nbytes for n, _ in values),
        weight_hash_before=ev_t["state_hash"],
        weight_hash_after=ev_tp["state_hash"],
        rollback_bit_exact=bool(untouched),
        target_untouched=bool(untouched),
        saved_to=str(folder),
        transfer=transfer,
        card=card,
        live_id=None,
        route="streamed",
        saved_files=edit.summary(),
    )


SWAP_TOOL = register(
    Tool(
        name="swap",
        code="T11",
        title="Module swap + before/after evaluation",
        summary="Copies the top-K ranked (or chosen) modules from donor into a working copy of the target, "
        "evaluates T, T' and D (perplexities, task score, TIR, Recovery, alignment), rolls back "
        "bit-exactly, optionally saves T'.",
        params_cls=SwapParams,
        compute=compute_swap,
        figure="viz.transplant:swap_figure",
        page="Transplant",
        same_family=True,
        streams=True,
        edits=True,
    )
)
