"""Module transplantation ("Beyond Learning"): T7 ranking, module swap with T11 before/after
evaluation, and the T8 transplant-strength sweep (METHODS.md).

T7 ``rank-modules``. For every linear module present in both models with identical stored
shape, both models read the workload and the module's output rows are captured (token level:
the same tokenizer is required). With ``o_D``, ``o_T`` the donor's and the target's output on
the same token,

    score = mean_tokens ||o_D - o_T||_2 / mean_tokens ||o_T||_2,

and the same ratio restricted to each text gives per-text scores. A module is in a text's top
decile when its per-text score ranks within the first ``ceil(top_decile * M)`` of the ``M``
modules (ties broken by block order); consistency = share of texts where that happens.

T11 ``swap``. Swap the top-K (or the named) modules from D into a working copy of T
(:class:`engine.transplant.ModuleSwap`, never touching the cached target), evaluate T, T' and D
(:func:`engine.evalcache.evaluate_model`), report TIR = S(T')/S(T) and
Recovery = (S(T') - S(T)) / (S(D) - S(T)) with their undefined cases, the alignment score of T
and T' against D, generations side by side, weight hashes, and verify a bit-exact rollback.

T8 ``sweep-k``. Rank once, then for each K in the grid apply the top-K modules on one working
copy, evaluate, roll back. Curves of TIR, Recovery and retained perplexity against K and the
attention / MLP share of the top K.

Cross-family pairs, or pairs with different tokenizers, are refused with one line
(:func:`engine.transplant.check_swap_pair`).
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from ..context import ToolContext
from ..data import ConceptSet, builtin_concept_path, builtin_retained_path, load_concept_set
from ..errors import GraftError
from ..evalcache import SCORES, alignment_score, evaluate_model
from ..evaluate import word_diff
from ..params import param
from ..progress import Progress
from ..registry import Tool, register
from ..transplant import ModuleSwap, check_swap_pair, save_transplant, swappable_modules, transfer_metrics

METRIC_KEYS = ("ppl_concept", "ppl_retained", "task_score", "task_score_exact", "task_score_graded")


def _r(x: Any, nd: int = 6) -> Optional[float]:
    """Round for JSON; None for anything missing or not finite (never NaN/Infinity)."""
    if x is None or isinstance(x, bool):
        return None
    x = float(x)
    return round(x, nd) + 0.0 if math.isfinite(x) else None  # + 0.0 turns -0.0 into 0.0


# =============================================================================================
# T7 ranking
# =============================================================================================


@dataclass(frozen=True)
class RankParams:
    top_decile: float = param(0.1, "Share of modules that counts as a text's 'top decile' for the consistency column (0.1 = the top 10%).", min=0.01, max=1.0)


@dataclass
class RankResult:
    modules: list[dict[str, Any]]  # best first: name, layer, canonical, kind, score, consistency
    n_modules: int
    n_attention: int
    n_mlp: int
    top_decile_size: int  # ceil(top_decile * n_modules)
    top_decile_attention: int  # kinds among the top decile of the overall ranking
    top_decile_mlp: int
    strip_rows: list[str]  # canonical module names (rows of the layers x module-kind strip)
    strip_layers: list[int]
    strip: list[list[Optional[float]]]  # score per (canonical, layer); None where absent
    skipped: list[dict[str, str]]  # modules not compared, with the reason
    alignment: str  # always "token"
    n_tokens: int
    n_texts: int


def rank_modules(ctx: ToolContext, progress: Progress, top_decile: float = 0.1) -> RankResult:
    """T7 activation-difference ranking (see the module docstring)."""
    check_swap_pair(ctx.donor, ctx.target)
    mods, skipped = swappable_modules(ctx.donor, ctx.target)
    if not mods:
        raise GraftError(f"no linear module has the same shape in {ctx.donor.label} and {ctx.target.label}")
    names = tuple(m.name for m in mods)
    cd, ct = ctx.capture_pair(progress.sub(0, 0.9), modules=names)
    if cd.token_ids != ct.token_ids:
        raise GraftError("donor and target tokenised the workload differently: token-level module outputs cannot be compared")
    progress(0.92, "scoring module output differences")
    text_index = ct.text_index  # (n,)
    n_texts = len(ct.texts)
    counts = torch.bincount(text_index, minlength=n_texts).double()  # (n_texts,)
    diff = torch.empty(len(mods), ct.n, dtype=torch.float64)  # (M, n) ||o_D - o_T||
    base = torch.empty(len(mods), ct.n, dtype=torch.float64)  # (M, n) ||o_T||
    for i, n in enumerate(names):
        od, ot = cd.modules[n].double(), ct.modules[n].double()  # (n, out)
        diff[i] = (od - ot).norm(dim=-1)
        base[i] = ot.norm(dim=-1)
    score = diff.mean(1) / base.mean(1).clamp_min(1e-30)  # (M,)
    # Per-text ratio of means: sums per text via index_add, then divide (the token counts cancel).
    d_text = torch.zeros(len(mods), n_texts, dtype=torch.float64).index_add_(1, text_index, diff)
    b_text = torch.zeros(len(mods), n_texts, dtype=torch.float64).index_add_(1, text_index, base)
    present = counts > 0
    per_text = d_text[:, present] / b_text[:, present].clamp_min(1e-30)  # (M, texts with tokens)
    k_top = max(1, math.ceil(top_decile * len(mods)))
    order_t = torch.sort(per_text, dim=0, descending=True, stable=True).indices[:k_top]  # (k_top, texts)
    in_top = torch.zeros_like(per_text, dtype=torch.bool).scatter_(0, order_t, True)
    consistency = in_top.double().mean(1)  # (M,)
    order = sorted(range(len(mods)), key=lambda i: (-float(score[i]), i))
    ranked = [
        {"name": mods[i].name, "layer": mods[i].layer, "canonical": mods[i].canonical, "kind": mods[i].kind,
         "score": _r(score[i]), "consistency": _r(consistency[i])}
        for i in order
    ]
    canon = list(dict.fromkeys(m.canonical for m in ctx.target.arch.linear_modules()))
    layers = list(range(ctx.target.arch.n_layers))
    cell = {(m["canonical"], m["layer"]): m["score"] for m in ranked}
    strip = [[cell.get((c, l)) for l in layers] for c in canon]
    top = ranked[:k_top]
    progress(1.0, "ranked")
    return RankResult(
        modules=ranked,
        n_modules=len(ranked),
        n_attention=sum(m["kind"] == "attention" for m in ranked),
        n_mlp=sum(m["kind"] == "mlp" for m in ranked),
        top_decile_size=k_top,
        top_decile_attention=sum(m["kind"] == "attention" for m in top),
        top_decile_mlp=sum(m["kind"] == "mlp" for m in top),
        strip_rows=canon,
        strip_layers=layers,
        strip=strip,
        skipped=skipped,
        alignment="token",
        n_tokens=ct.n,
        n_texts=int(present.sum()),
    )


def compute_rank(ctx: ToolContext, params: RankParams, progress: Progress) -> RankResult:
    return rank_modules(ctx, progress, params.top_decile)


# =============================================================================================
# Shared by swap and sweep
# =============================================================================================


def _load_sets(concept: str, retained: str) -> tuple[ConceptSet, ConceptSet]:
    return (load_concept_set(concept or builtin_concept_path()),
            load_concept_set(retained or builtin_retained_path()))


def _metrics(ev: dict[str, Any]) -> dict[str, Optional[float]]:
    return {k: _r(ev[k]) for k in METRIC_KEYS}


def _transfer(s_t: float, s_tp: float, s_d: float) -> dict[str, Any]:
    tm = transfer_metrics(s_t, s_tp, s_d)
    tm["tir"], tm["recovery"] = _r(tm["tir"]), _r(tm["recovery"])
    return tm


def _evaluate_shared(model: Any, sets: tuple[ConceptSet, ConceptSet], score: str, max_new_tokens: int,
                     progress: Progress, state_hash: Optional[str] = None, exact: bool = True) -> dict[str, Any]:
    """Evaluate a cached shared model (LoadedModel) under its lock: a capture elsewhere attaches hooks."""
    with model.lock:
        return evaluate_model(model.model, model.tokenizer, sets[0], sets[1], score=score, exact=exact,
                              max_new_tokens=max_new_tokens, state_hash=state_hash, progress=progress)


@contextmanager
def _locked(*models: Any) -> Iterator[None]:
    """Hold the lock of each distinct model (donor and target may be one object; locks are not re-entrant)."""
    with ExitStack() as stack:
        seen: set[int] = set()
        for m in models:
            if id(m.lock) not in seen:
                seen.add(id(m.lock))
                stack.enter_context(m.lock)
        yield


# =============================================================================================
# T11 module swap + before/after evaluation
# =============================================================================================


@dataclass(frozen=True)
class SwapParams:
    k: int = param(8, "Swap the top-K modules of the T7 ranking (ignored when --modules is given).", min=1, max=100_000)
    modules: str = param("", "Comma-separated module names to swap instead of the top K, e.g. 'blocks.3.attn.o,blocks.5.mlp.down'.")
    concept: str = param("", "Concept set JSONL: perplexity on its facts and task score on its test questions. Empty = the bundled set.", path="in")
    retained: str = param("", "Retained general set JSONL for the retained perplexity. Empty = the bundled set.", path="in")
    score: str = param("graded", "Task score S behind TIR and Recovery: graded (mean answer-token probability) or exact (greedy answer contains the reference).", choices=SCORES)
    save: str = param("", "Save T' into this folder (Hugging Face format + surgery.json). Empty = don't save.", path="out_dir")
    max_new_tokens: int = param(16, "Greedy tokens generated per test question (exact score, generations).", min=1, max=512)


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
    transfer: dict[str, dict[str, Any]]  # TIR / Recovery (+ status, note) under each score kind: graded, exact
    card: dict[str, Any]  # the surgery card saved with T' (operation, models, parameters, results, hashes)
    live_id: Optional[str]  # app only: T' is kept applied under this id (engine/live.py); None from the CLI


def _parse_modules(text: str) -> list[str]:
    return list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))


def _side_by_side(ev_t: dict, ev_tp: dict, ev_d: dict) -> list[dict[str, Any]]:
    rows = []
    for a, b, c in zip(ev_t["items"], ev_tp["items"], ev_d["items"]):
        rows.append({
            "question": a["question"], "reference": a["answer"],
            "target": a["generation"], "transplanted": b["generation"], "donor": c["generation"],
            "target_correct": a["correct"], "transplanted_correct": b["correct"], "donor_correct": c["correct"],
            "changed": a["generation"] != b["generation"],
            "diff": word_diff(a["generation"], b["generation"]),  # target -> transplanted, word level
        })
    return rows


def compute_swap(ctx: ToolContext, params: SwapParams, progress: Progress) -> SwapResult:
    check_swap_pair(ctx.donor, ctx.target)
    sets = _load_sets(params.concept, params.retained)
    swappable, _ = swappable_modules(ctx.donor, ctx.target)
    explicit = _parse_modules(params.modules)
    if explicit:
        chosen = [{"name": n, "layer": None, "kind": None, "score": None} for n in explicit]
        by_name = {m.name: m for m in swappable}
        for row in chosen:
            if row["name"] in by_name:
                row.update(layer=by_name[row["name"]].layer, kind=by_name[row["name"]].kind)
        progress(0.25, "modules chosen by hand")
    else:
        ranking = rank_modules(ctx, progress.sub(0, 0.25))
        chosen = [{k: m[k] for k in ("name", "layer", "kind", "score")} for m in ranking.modules[: params.k]]
    swap = ModuleSwap(ctx.target, ctx.donor, [m["name"] for m in chosen])
    for row, n in zip(chosen, swap.modules):
        row.update(layer=swap.linear[n].layer, kind=swap.linear[n].kind)

    test_q = [q.question for q in sets[0].test_qa()]
    hash_t = swap.hash_before()
    progress(0.3, "evaluating the target T")
    ev_t = _evaluate_shared(ctx.target, sets, params.score, params.max_new_tokens, progress.sub(0.3, 0.45), hash_t)
    progress(0.45, "evaluating the donor D")
    ev_d = _evaluate_shared(ctx.donor, sets, params.score, params.max_new_tokens, progress.sub(0.45, 0.6))

    progress(0.6, f"swapping {len(swap.modules)} modules into a working copy")
    swap.materialise()
    swap.apply()
    hash_tp = swap.weight_hash()
    ev_tp = evaluate_model(swap.working, ctx.target.tokenizer, sets[0], sets[1], score=params.score,
                           max_new_tokens=params.max_new_tokens, state_hash=hash_tp, progress=progress.sub(0.62, 0.8))
    progress(0.8, "alignment with the donor")
    with _locked(ctx.donor, ctx.target):
        al_before = alignment_score(ctx.donor.model, ctx.donor.tokenizer, ctx.target.model, ctx.target.tokenizer, test_q,
                                    donor_hash=ev_d["state_hash"], state_hash=hash_t)
        al_after = alignment_score(ctx.donor.model, ctx.donor.tokenizer, swap.working, ctx.target.tokenizer, test_q,
                                   donor_hash=ev_d["state_hash"], state_hash=hash_tp)
    transfer = {kind: _transfer(ev_t[f"task_score_{kind}"], ev_tp[f"task_score_{kind}"], ev_d[f"task_score_{kind}"])
                for kind in SCORES}
    tm = transfer[params.score]  # the run's own score kind (task_score is that kind's score)
    before, after, donor = _metrics(ev_t), _metrics(ev_tp), _metrics(ev_d)

    card = {
        "operation": "module-swap",
        "donor": ctx.donor.spec.ref,
        "target": ctx.target.spec.ref,
        "modules": list(swap.modules),
        "parameters": {"k": params.k, "modules": params.modules, "score": params.score,
                       "max_new_tokens": params.max_new_tokens,
                       "concept": {"name": sets[0].name, "sha256": sets[0].sha256},
                       "retained": {"name": sets[1].name, "sha256": sets[1].sha256},
                       "workload": {"name": ctx.workload.name, "sha256": ctx.workload.sha256}},
        "results": {"before": before, "after": after, "donor": donor, "tir": tm["tir"], "recovery": tm["recovery"],
                    "tir_note": tm["tir_note"], "recovery_note": tm["recovery_note"], "score_kind": params.score,
                    "transfer": transfer, "alignment_before": _r(al_before["score"]), "alignment_after": _r(al_after["score"])},
        "hashes": {"target": hash_t, "transplanted": hash_tp, "donor": ev_d["state_hash"]},
        "trust_remote_code": bool(ctx.donor.spec.trust_remote_code or ctx.target.spec.trust_remote_code),
    }
    saved_to = None
    if params.save.strip():
        progress(0.88, f"saving T' to {params.save}")
        saved_to = str(save_transplant(swap.working, ctx.target.tokenizer, params.save, card))

    progress(0.95, "rolling back and verifying")
    swap.rollback()
    bit_exact = swap.weight_hash() == hash_t and swap.verify_rollback()
    untouched = ctx.target.state_hash() == hash_t
    live_id = None
    if ctx.live is not None and bit_exact:
        swap.apply()  # the app keeps T' applied: rollback and save are then one click each
        live_id = ctx.live.keep(swap, card)
    progress(1.0, "done")
    return SwapResult(
        modules=chosen,
        selection="explicit" if explicit else "top-k",
        k=len(swap.modules),
        score_kind=params.score,
        before=before, after=after, donor=donor,
        tir=tm["tir"], recovery=tm["recovery"],
        tir_status=tm["tir_status"], recovery_status=tm["recovery_status"],
        tir_note=tm["tir_note"], recovery_note=tm["recovery_note"],
        alignment_before=_r(al_before["score"]), alignment_after=_r(al_after["score"]),
        generations=_side_by_side(ev_t, ev_tp, ev_d),
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


# =============================================================================================
# T8 transplant-strength sweep
# =============================================================================================


@dataclass(frozen=True)
class SweepParams:
    k_grid: str = param("", "Comma-separated K values, e.g. '0,1,2,4,8,16,32'. Empty = 0, 1, 2, 4, ... doubling up to every swappable module. Values above that number are clipped.")
    concept: str = param("", "Concept set JSONL: task score on its test questions. Empty = the bundled set.", path="in")
    retained: str = param("", "Retained general set JSONL for the retained perplexity. Empty = the bundled set.", path="in")
    score: str = param("graded", "Task score S behind TIR and Recovery: graded (mean answer-token probability) or exact (greedy answer contains the reference).", choices=SCORES)
    max_new_tokens: int = param(16, "Greedy tokens generated per test question (exact score only).", min=1, max=512)


@dataclass
class SweepResult:
    points: list[dict[str, Any]]  # per K: k, task_score(s), tir, recovery, notes, ppl_*, shares;
    # task_score_exact is None unless score = exact (greedy generations are skipped otherwise)
    ranked: list[dict[str, Any]]  # the top K_max modules, best first: name, layer, kind, score
    score_kind: str
    target: dict[str, Optional[float]]
    donor: dict[str, Optional[float]]
    tir_note: str  # why TIR is undefined at every K (S(T) = 0), else ""
    recovery_note: str  # why Recovery is undefined at every K (S(D) = S(T)), else ""
    n_swappable: int
    k_clipped: list[int]  # requested K values above n_swappable (clipped)
    rollback_bit_exact: bool
    target_untouched: bool


def default_k_grid(n: int) -> list[int]:
    """0, 1, 2, 4, ... doubling while below ``n``, then ``n``."""
    grid, k = [0], 1
    while k < n:
        grid.append(k)
        k *= 2
    if n > 0:
        grid.append(n)
    return grid


def parse_k_grid(text: str, n: int) -> tuple[list[int], list[int]]:
    """Sorted unique K values from ``text`` (or the default grid) and the values clipped to ``n``."""
    if not text.strip():
        return default_k_grid(n), []
    ks: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            k = int(part)
        except ValueError:
            raise GraftError(f"--k-grid expects comma-separated integers, got {part!r}") from None
        if k < 0:
            raise GraftError(f"--k-grid values must be >= 0, got {k}")
        ks.append(k)
    if not ks:
        raise GraftError("--k-grid has no values")
    clipped = sorted({k for k in ks if k > n})
    return sorted({min(k, n) for k in ks}), clipped


def compute_sweep(ctx: ToolContext, params: SweepParams, progress: Progress) -> SweepResult:
    check_swap_pair(ctx.donor, ctx.target)
    sets = _load_sets(params.concept, params.retained)
    ranking = rank_modules(ctx, progress.sub(0, 0.15))
    grid, clipped = parse_k_grid(params.k_grid, ranking.n_modules)
    k_max = max(grid)
    ranked = [{k: m[k] for k in ("name", "layer", "kind", "score")} for m in ranking.modules[:k_max]]
    progress(0.16, "evaluating the target T")
    exact = params.score == "exact"  # greedy generations are the slow part: only when S needs them
    ev_t = _evaluate_shared(ctx.target, sets, params.score, params.max_new_tokens, progress.sub(0.16, 0.22), exact=exact)
    progress(0.22, "evaluating the donor D")
    ev_d = _evaluate_shared(ctx.donor, sets, params.score, params.max_new_tokens, progress.sub(0.22, 0.28), exact=exact)
    s_t, s_d = ev_t["task_score"], ev_d["task_score"]
    base = _transfer(s_t, s_t, s_d)
    swap = ModuleSwap(ctx.target, ctx.donor, [m["name"] for m in ranked]) if k_max > 0 else None
    hash_t = ev_t["state_hash"]
    points = []
    span = 0.7 / len(grid)
    for i, k in enumerate(grid):
        p = progress.sub(0.28 + i * span, 0.28 + (i + 1) * span)
        p(0.0, f"K = {k}: swapping the top {k} modules")
        if k == 0 or swap is None:
            ev = ev_t
        else:
            try:
                swap.apply([m["name"] for m in ranked[:k]])
                ev = evaluate_model(swap.working, ctx.target.tokenizer, sets[0], sets[1], score=params.score, exact=exact,
                                    max_new_tokens=params.max_new_tokens, progress=p.sub(0.05, 0.95))
            finally:  # also on cancel: the working copy goes back to T before the next K (or the exit)
                swap.rollback()
        tm = _transfer(s_t, ev["task_score"], s_d)
        n_att = sum(m["kind"] == "attention" for m in ranked[:k])
        points.append({
            "k": k,
            "task_score": _r(ev["task_score"]),
            "task_score_exact": _r(ev["task_score_exact"]),
            "task_score_graded": _r(ev["task_score_graded"]),
            "tir": tm["tir"], "recovery": tm["recovery"],
            "tir_note": tm["tir_note"], "recovery_note": tm["recovery_note"],
            "ppl_concept": _r(ev["ppl_concept"]),
            "ppl_retained": _r(ev["ppl_retained"]),
            "n_attention": n_att,
            "n_mlp": k - n_att,
            "attention_share": _r(n_att / k) if k else None,
            "mlp_share": _r((k - n_att) / k) if k else None,
        })
        p(1.0, f"K = {k}: evaluated")
    bit_exact = True
    if swap is not None:
        bit_exact = swap.weight_hash() == hash_t and swap.verify_rollback()
    untouched = ctx.target.state_hash() == hash_t
    progress(1.0, "done")
    return SweepResult(
        points=points,
        ranked=ranked,
        score_kind=params.score,
        target=_metrics(ev_t),
        donor=_metrics(ev_d),
        tir_note=base["tir_note"],
        recovery_note=base["recovery_note"],
        n_swappable=ranking.n_modules,
        k_clipped=clipped,
        rollback_bit_exact=bool(bit_exact),
        target_untouched=bool(untouched),
    )


# =============================================================================================

RANK_TOOL = register(Tool(
    name="rank-modules", code="T7", title="Activation-difference module ranking",
    summary="Ranks every linear module shared by donor and target by how differently it responds to the workload: mean ||o_D − o_T|| / mean ||o_T||, with per-text consistency.",
    params_cls=RankParams, compute=compute_rank, figure="viz.transplant:rank_figure", page="Transplant", same_family=True,
))

SWAP_TOOL = register(Tool(
    name="swap", code="T11", title="Module swap + before/after evaluation",
    summary="Copies the top-K ranked (or chosen) modules from donor into a working copy of the target, evaluates T, T' and D (perplexities, task score, TIR, Recovery, alignment), rolls back bit-exactly, optionally saves T'.",
    params_cls=SwapParams, compute=compute_swap, figure="viz.transplant:swap_figure", page="Transplant", same_family=True,
))

SWEEP_TOOL = register(Tool(
    name="sweep-k", code="T8", title="Transplant-strength sweep",
    summary="TIR, Recovery and retained perplexity as the number K of swapped top-ranked modules grows, with the attention/MLP share of the top K.",
    params_cls=SweepParams, compute=compute_sweep, figure="viz.transplant:sweep_figure", page="Transplant", same_family=True,
))
