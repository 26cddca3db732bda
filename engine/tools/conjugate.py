"""Rank-k conjugation transplant (docs/methods.md operation 3), as a registered tool: ``conjugate``.

Inputs: the concept's update ``dW`` as a LoRA adapter (``--adapter``, trained on ``--base``) or as
a full fine-tune (``--donor`` against ``--base``), and the ``--target`` it is carried into. The
workload's texts are what every map is fitted on (:mod:`engine.surgery.conjugate_plan` and
:mod:`engine.surgery.conjugate_maps` hold the maths: per-side identity / Procrustes / ridge maps, T2's layer
matching, rank-k truncation from the factors; :mod:`engine.surgery.conjugate` the reversible edit).

The run evaluates T, T' and D exactly as the module swap does (:mod:`engine.evaluation.beforeafter`), with
D = the update applied to its own base (the adapter merged into a working copy of the base in
memory, or the fine-tuned donor itself), so TIR and Recovery read "how much of what the update
does on its own base it does on the target". It then checks interference on the retained set
(:mod:`engine.evaluation.interference`: retained perplexity and locality) and rolls T' back automatically
when retained perplexity rises by more than ``max_retained_increase`` (or locality falls below
``min_locality``), saying why. Without ``--save`` the CLI rolls the target back before returning;
the app keeps T' applied for one-click roll back and save, like a swap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..core.errors import GraftError
from ..core.params import EvaluationSets, GreedyTokensParam, TaskScoreParam, param
from ..core.progress import Progress
from ..evaluation.beforeafter import (
    load_sets,
    locked,
    metrics,
    rnd,
    side_by_side,
    transfer_scores,
)
from ..evaluation.evalcache import SCORES, alignment_score, evaluate_model
from ..evaluation.interference import interference, should_roll_back
from ..running.conjugation import conjugation_plan, merged_donor, update_deltas
from ..running.context import ToolContext
from ..running.registry import Tool, register
from ..running.stream_surgery import need_save
from ..surgery.conjugate import Conjugation

MAPS = ("auto", "identity", "procrustes", "ridge")


@dataclass(frozen=True)
class ConjugateParams(EvaluationSets, TaskScoreParam, GreedyTokensParam):
    k: int = param(0, "Rank kept per module (0 = each module's full rank).", min=0, max=100_000)
    energy: float = param(
        0.0,
        "Keep, per module, the smallest rank reaching this share of ||dW||^2 (T6); 0 = off. "
        "With k as well, the smaller rank wins.",
        min=0.0,
        max=1.0,
    )
    rank: int = param(16, "Full fine-tune only: rank of the randomized SVD of W_D - W_base.", min=1, max=4096)
    map: str = param(
        "auto",
        "Map of every side: auto picks identity / Procrustes / ridge per side by held-out "
        "residual; identity everywhere = a plain merge (an ablation).",
        choices=MAPS,
    )
    ridge_alpha: float = param(
        0.0,
        "Ridge strength relative to the mean eigenvalue of X^T X; 0 = chosen per side on "
        "a split of the fit rows.",
        min=0.0,
        max=1e6,
    )
    heldout_fraction: float = param(
        0.25, "Share of texts held out to judge each side's map.", min=0.05, max=0.9
    )
    seed: int = param(0, "Seed of the fit / held-out split and of the randomized SVD.", min=0, max=2**31 - 1)
    max_retained_increase: float = param(
        0.05,
        "Roll back automatically when retained perplexity rises by more than this fraction "
        "(0.05 = 5%); negative = never roll back.",
        min=-1.0,
        max=1e6,
    )
    min_locality: float = param(
        0.0,
        "Also roll back when fewer than this share of retained prompts keep their greedy "
        "continuation; 0 = off.",
        min=0.0,
        max=1.0,
    )
    prompt_tokens: int = param(
        16, "Retained prompts for locality: the first this many tokens of each text.", min=1, max=4096
    )
    save: str = param(
        "",
        "Save T' into this folder (Hugging Face format + surgery.json) unless it was rolled back. "
        "Empty = don't save.",
        path="out_dir",
    )


@dataclass
class ConjugateResult:
    source: dict[str, Any]  # what dW is: adapter (path, config) or full fine-tune (donor, rank)
    base: str
    modules: list[dict[str, Any]]  # per module: donor layer, target layer, k, energy kept, map of each side
    map_counts: dict[str, dict[str, int]]
    layer_map: list[list[int]]
    score_kind: str
    before: dict[str, Optional[float]]  # T
    after: dict[str, Optional[float]]  # T' (measured before any auto-rollback)
    donor: dict[str, Optional[float]]  # D = the update on its own base
    tir: Optional[float]
    recovery: Optional[float]
    tir_note: str
    recovery_note: str
    transfer: dict[str, dict[str, Any]]  # TIR / Recovery per score kind, as swap
    interference: dict[str, Any]  # retained perplexity before/after, locality, worst examples
    rolled_back: bool
    roll_back_reason: str
    alignment_before: Optional[float]
    alignment_after: Optional[float]
    alignment_note: str
    generations: list[dict[str, Any]]
    n_test_items: int
    n_modules: int
    n_conjugated: int
    mean_energy_kept: Optional[float]
    weight_hash_before: str
    weight_hash_after: str
    rollback_bit_exact: Optional[bool]
    target_untouched: bool
    saved_to: Optional[str]
    card: dict[str, Any]
    live_id: Optional[str]
    warnings: list[str]
    plan: dict[str, Any]  # the full plan report (row alignment, residuals, skipped modules, timings)
    route: str = "whole"  # "whole": models in memory; "streamed": T' edited on disk, read by block
    saved_files: Optional[dict[str, Any]] = None  # streamed: tensors and bytes written, copied, linked


def measure_conjugation(
    ctx: ToolContext,
    params: ConjugateParams,
    sets: Any,
    nets: dict[str, Any],
    hashes: dict[str, Optional[str]],
    progress: Progress,
    exact: bool = True,
    streamed: bool = False,
) -> dict[str, Any]:
    """Evaluate T, D and T' (``nets``: "t", "d", "tp" -> (model, tokenizer)), their transfer, the
    alignment with D and the interference on the retained set. Either route gives model objects: held
    whole, or streamed ones inside :func:`engine.loading.stream_forward.streamed_forward`."""
    (t_net, t_tok), (d_net, d_tok), (tp_net, _) = nets["t"], nets["d"], nets["tp"]

    def ev(net: Any, tok: Any, h: Optional[str], lo: float, hi: float) -> dict[str, Any]:
        return evaluate_model(
            net,
            tok,
            sets[0],
            sets[1],
            score=params.score,
            exact=exact,
            max_new_tokens=params.max_new_tokens,
            state_hash=h,
            progress=progress.sub(lo, hi),
        )

    progress(0.0, "evaluating the target T")
    ev_t = ev(t_net, t_tok, hashes["t"], 0.0, 0.25)
    progress(0.25, "evaluating D: the update on its own base")
    ev_d = ev(d_net, d_tok, hashes["d"], 0.25, 0.5)
    progress(0.5, "evaluating T'")
    ev_tp = ev(tp_net, t_tok, hashes["tp"], 0.5, 0.7)
    transfer = {
        kind: transfer_scores(
            ev_t[f"task_score_{kind}"], ev_tp[f"task_score_{kind}"], ev_d[f"task_score_{kind}"]
        )
        for kind in SCORES
    }
    test_q = [q.question for q in sets[0].test_qa()]
    dh = ev_d["state_hash"]
    # one tokenizer: greedy next tokens; two: greedy next words (a streamed pass reads the model
    # once per step, so there every prefix goes in one batch)
    batch = 100_000 if streamed else 16
    al_before = alignment_score(
        d_net, d_tok, t_net, t_tok, test_q, donor_hash=dh, state_hash=ev_t["state_hash"], batch=batch
    )
    al_after = alignment_score(
        d_net, d_tok, tp_net, t_tok, test_q, donor_hash=dh, state_hash=ev_tp["state_hash"], batch=batch
    )
    align_note = (
        f"word level: greedy next words at {al_after['n_positions']} word ends of the test questions "
        "(the tokenizers differ)"
        if al_after["level"] == "word"
        else ""
    )
    al_before, al_after = al_before["score"], al_after["score"]
    progress(0.75, "interference check on the retained set")
    inter = interference(
        t_net,
        tp_net,
        t_tok,
        sets[1].texts(),
        max_new_tokens=params.max_new_tokens,
        prompt_tokens=params.prompt_tokens,
        batch_size=ctx.options.batch_size,
        progress=progress.sub(0.75, 1.0),
    )
    return {
        "ev_t": ev_t,
        "ev_d": ev_d,
        "ev_tp": ev_tp,
        "transfer": transfer,
        "tm": transfer[params.score],
        "al_before": al_before,
        "al_after": al_after,
        "align_note": align_note,
        "inter": inter,
        "n_test": len(test_q),
    }


def compute_conjugate(ctx: ToolContext, params: ConjugateParams, progress: Progress) -> ConjugateResult:
    base, target = ctx.base, ctx.target
    assert base is not None and target is not None and ctx.workload is not None
    sets = load_sets(params.concept, params.retained)
    if target.streamed:
        need_save(params.save, "the conjugation")
    progress(0.0, "reading the update dW")
    deltas, source, warnings = update_deltas(ctx, params, progress.sub(0.0, 0.05))
    if not deltas:
        raise GraftError("the update has no module to carry")
    plan = conjugation_plan(ctx, params, deltas, progress.sub(0.05, 0.5))
    rep = plan.report()
    ctx.meta["plan_seconds"] = rep.get("seconds")  # timings go in meta: the result itself is deterministic
    warnings += list(rep.get("warnings") or [])
    conj = Conjugation(target, plan)
    if target.streamed:
        from ._conjugate_streamed import conjugate_streamed

        return conjugate_streamed(ctx, params, progress, sets, deltas, conj, rep, source, warnings)

    if ctx.donor is not None:
        d_model, d_tok = ctx.donor.model, ctx.donor.tokenizer
    else:
        d_model, d_tok = merged_donor(base, deltas), base.tokenizer
    hash_t = conj.hash_before()
    progress(0.5, "adding the conjugated update to a working copy of T")
    conj.apply()
    hash_tp = conj.weight_hash()
    with locked(*[m for m in (target, ctx.donor) if m is not None]):
        m = measure_conjugation(
            ctx,
            params,
            sets,
            {
                "t": (target.model, target.tokenizer),
                "d": (d_model, d_tok),
                "tp": (conj.working, target.tokenizer),
            },
            {"t": hash_t, "d": None, "tp": hash_tp},
            progress.sub(0.5, 0.95),
        )
    roll, why = should_roll_back(
        m["inter"],
        params.max_retained_increase if params.max_retained_increase >= 0 else None,
        min_locality=params.min_locality or None,
    )
    extra = card_extra(ctx, params, source, m, hash_t, hash_tp)
    card = conj.card(**extra)
    saved_to = None
    exact: Optional[bool] = None
    if roll:
        progress(0.96, "rolling back: " + why)
        conj.rollback()
        exact = conj.matches_target()
    elif params.save:
        progress(0.96, f"saving T' to {params.save}")
        saved_to = conj.save(params.save, **extra)
    progress(1.0, "done")  # the last cancel point: a cancelled run keeps nothing in memory
    live_id = None
    if not roll and ctx.live is not None:
        live_id = ctx.live.keep(conj, card)  # the app keeps T' applied for one-click roll back / save
    elif not roll:
        conj.rollback()  # the CLI never leaves an applied working copy behind
        exact = conj.matches_target()
    untouched = target.state_hash() == hash_t
    return make_result(
        m,
        params,
        source,
        base,
        rep,
        roll,
        why,
        hash_t,
        hash_tp,
        exact,
        untouched,
        saved_to,
        card,
        live_id,
        warnings,
    )


def card_extra(
    ctx: ToolContext, params: ConjugateParams, source: dict, m: dict, hash_t: str, hash_tp: str
) -> dict[str, Any]:
    """The run's part of the surgery card: source, parameters, options, results, hashes."""
    base, target = ctx.base, ctx.target
    return dict(
        source=source,
        params={k: getattr(params, k) for k in params.__dataclass_fields__},
        options={
            "workload": {"name": ctx.workload.name, "sha256": ctx.workload.sha256},
            "max_tokens": ctx.options.max_tokens,
            "outlier_factor": ctx.options.outlier_factor,
        },
        results={
            "before": metrics(m["ev_t"]),
            "after": metrics(m["ev_tp"]),
            "donor": metrics(m["ev_d"]),
            "tir": m["tm"]["tir"],
            "recovery": m["tm"]["recovery"],
            "score_kind": params.score,
            "transfer": m["transfer"],
            "retained_ppl_change": rnd(m["inter"].get("ppl_change_fraction")),
            "locality": rnd(m["inter"].get("locality")),
        },
        hashes={"target": hash_t, "transplanted": hash_tp},
        trust_remote_code=bool(target.spec.trust_remote_code or base.spec.trust_remote_code),
    )


def make_result(
    m: dict,
    params: ConjugateParams,
    source: dict,
    base: Any,
    rep: dict,
    roll: bool,
    why: str,
    hash_t: str,
    hash_tp: str,
    exact: Optional[bool],
    untouched: bool,
    saved_to: Optional[str],
    card: dict,
    live_id: Optional[str],
    warnings: list[str],
    route: str = "whole",
    saved_files: Optional[dict] = None,
) -> ConjugateResult:
    ev_t, ev_tp, ev_d, tm = m["ev_t"], m["ev_tp"], m["ev_d"], m["tm"]
    return ConjugateResult(
        source=source,
        base=base.spec.ref,
        modules=list(rep.get("modules") or []),
        map_counts=rep.get("map_counts") or {},
        layer_map=[list(p) for p in rep.get("layer_map") or []],
        score_kind=params.score,
        before=metrics(ev_t),
        after=metrics(ev_tp),
        donor=metrics(ev_d),
        tir=tm["tir"],
        recovery=tm["recovery"],
        tir_note=tm["tir_note"],
        recovery_note=tm["recovery_note"],
        transfer=m["transfer"],
        interference={k: v for k, v in m["inter"].items()},
        rolled_back=bool(roll),
        roll_back_reason=why if roll else "",
        alignment_before=rnd(m["al_before"]),
        alignment_after=rnd(m["al_after"]),
        alignment_note=m["align_note"],
        generations=side_by_side(ev_t, ev_tp, ev_d)
        if ev_t["items"] and "generation" in ev_t["items"][0]
        else [],
        n_test_items=m["n_test"],
        n_modules=int(rep.get("n_modules") or 0),
        n_conjugated=int(rep.get("n_conjugated") or 0),
        mean_energy_kept=rnd(rep.get("mean_energy_kept")),
        weight_hash_before=hash_t,
        weight_hash_after=hash_tp,
        rollback_bit_exact=exact,
        target_untouched=untouched,
        saved_to=saved_to,
        card=card,
        live_id=live_id,
        warnings=warnings,
        plan={k: v for k, v in rep.items() if k not in ("modules", "seconds")},
        route=route,
        saved_files=saved_files,
    )


TOOL = register(
    Tool(
        name="conjugate",
        code="OP3",
        title="Rank-k conjugation transplant",
        summary="Carries a donor's update dW (LoRA adapter or full fine-tune, truncated to rank k) into "
        "the target's "
        "coordinates through per-side maps fitted on the activations each side sees (identity, Procrustes "
        "or ridge), adds it reversibly, evaluates T, T' and D, checks interference and rolls back "
        "automatically "
        "when retained perplexity worsens past your threshold.",
        params_cls=ConjugateParams,
        compute=compute_conjugate,
        figure="viz.compare:conjugate_figure",
        page="Concept",
        needs=(("adapter", "base", "target"), ("donor", "base", "target")),
        run_label="Run conjugation",
        streams=True,
        edits=True,
    )
)
