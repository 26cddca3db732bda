"""T8 ``sweep-k``. Rank once, then for each K in the grid apply the top-K modules on one working
copy, evaluate, roll back. Curves of TIR, Recovery and retained perplexity against K and the
attention / MLP share of the top K.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..core.errors import GraftError
from ..core.params import EvaluationSets, GreedyTokensParam, TaskScoreParam, list_items, param
from ..core.progress import Progress
from ..evaluation.beforeafter import evaluate_shared, load_sets, metrics, rnd, transfer_scores
from ..evaluation.evalcache import evaluate_model
from ..running.cells import run_cells
from ..running.context import ToolContext
from ..running.module_choice import rank_modules
from ..running.registry import Tool, register
from ..surgery.transplant import ModuleSwap, check_swap_pair


@dataclass(frozen=True)
class SweepParams(EvaluationSets, TaskScoreParam, GreedyTokensParam):
    k_grid: str = param(
        "",
        "Comma-separated K values, e.g. '0,1,2,4,8,16,32'. Empty = 0, 1, 2, 4, ... doubling up to every "
        "swappable module. Values above that number are clipped.",
    )


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
    items = list_items(text, "--k-grid", "the default grid (0, 1, 2, 4, ... doubling)")
    if not items:
        return default_k_grid(n), []
    ks: list[int] = []
    for part in items:
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


EV_KEYS = ("task_score", "task_score_exact", "task_score_graded", "ppl_concept", "ppl_retained")


def _swap(ctx: ToolContext, shared: dict[str, Any]) -> ModuleSwap:
    """This process's working copy for the sweep's modules (one per process, reused by every K)."""
    key = ("sweep-k swap", tuple(shared["modules"]))
    if key not in ctx.memo:
        ctx.memo[key] = ModuleSwap(ctx.target, ctx.donor, shared["modules"])
    return ctx.memo[key]


def sweep_cell(ctx: ToolContext, shared: dict[str, Any], cell: dict[str, Any], progress: Progress) -> dict:
    """One K: swap the top K modules into the working copy, evaluate, roll back (also on cancel)."""
    key = ("sweep-k sets", shared["concept"], shared["retained"])
    if key not in ctx.memo:
        ctx.memo[key] = load_sets(shared["concept"], shared["retained"])
    concept, retained = ctx.memo[key]
    swap, k = _swap(ctx, shared), int(cell["k"])
    progress(0.0, f"K = {k}: swapping the top {k} modules")
    try:
        swap.apply(shared["modules"][:k])
        ev = evaluate_model(
            swap.working,
            ctx.target.tokenizer,
            concept,
            retained,
            score=shared["score"],
            exact=shared["exact"],
            max_new_tokens=shared["max_new_tokens"],
            progress=progress.sub(0.05, 0.95),
        )
    finally:  # also on cancel: the working copy goes back to T before the next K (or the exit)
        swap.rollback()
    return {key_: ev[key_] for key_ in EV_KEYS}


def sweep_finish(ctx: ToolContext, shared: dict[str, Any]) -> dict:
    """After the last K: is this process's working copy the target again, bit for bit?"""
    key = ("sweep-k swap", tuple(shared["modules"]))
    swap = ctx.memo.pop(key, None)
    if swap is None:
        return {"rollback_bit_exact": True}
    # the target's hash from the driver's evaluation of T: a worker loaded the same weights by spec
    exact = swap.weight_hash() == shared["target_hash"] and swap.verify_rollback()
    return {"rollback_bit_exact": bool(exact)}


def compute_sweep(ctx: ToolContext, params: SweepParams, progress: Progress) -> SweepResult:
    check_swap_pair(ctx.donor, ctx.target)
    sets = load_sets(params.concept, params.retained)
    ranking = rank_modules(ctx, progress.sub(0, 0.15))
    grid, clipped = parse_k_grid(params.k_grid, ranking.n_modules)
    k_max = max(grid)
    ranked = [{k: m[k] for k in ("name", "layer", "kind", "score")} for m in ranking.modules[:k_max]]
    progress(0.16, "evaluating the target T")
    exact = params.score == "exact"  # greedy generations are the slow part: only when S needs them
    ev_t = evaluate_shared(
        ctx.target, sets, params.score, params.max_new_tokens, progress.sub(0.16, 0.22), exact=exact
    )
    progress(0.22, "evaluating the donor D")
    ev_d = evaluate_shared(
        ctx.donor, sets, params.score, params.max_new_tokens, progress.sub(0.22, 0.28), exact=exact
    )
    s_t, s_d = ev_t["task_score"], ev_d["task_score"]
    base = transfer_scores(s_t, s_t, s_d)
    hash_t = ev_t["state_hash"]
    shared = {
        "modules": [m["name"] for m in ranked],
        "concept": params.concept,
        "retained": params.retained,
        "score": params.score,
        "exact": exact,
        "max_new_tokens": params.max_new_tokens,
        "target_hash": hash_t,
    }
    cells = [{"k": k} for k in grid if k > 0]
    run = run_cells(
        ctx, sweep_cell, shared, cells, progress.sub(0.28, 0.98), lambda c: f"K = {c['k']}", sweep_finish
    )
    measured = {c["k"]: (r, run.failed.get(i)) for i, (c, r) in enumerate(zip(cells, run.results))}
    points = []
    for k in grid:
        ev, failed = (ev_t, None) if k == 0 else measured[k]
        ev = ev or dict.fromkeys(EV_KEYS)  # a cell whose Ray worker died twice: no numbers
        tm = transfer_scores(s_t, ev["task_score"], s_d) if ev["task_score"] is not None else {}
        n_att = sum(m["kind"] == "attention" for m in ranked[:k])
        points.append(
            {
                "k": k,
                "task_score": rnd(ev["task_score"]),
                "task_score_exact": rnd(ev["task_score_exact"]),
                "task_score_graded": rnd(ev["task_score_graded"]),
                "tir": tm.get("tir"),
                "recovery": tm.get("recovery"),
                "tir_note": tm.get("tir_note", ""),
                "recovery_note": tm.get("recovery_note", ""),
                "ppl_concept": rnd(ev["ppl_concept"]),
                "ppl_retained": rnd(ev["ppl_retained"]),
                "n_attention": n_att,
                "n_mlp": k - n_att,
                "attention_share": rnd(n_att / k) if k else None,
                "mlp_share": rnd((k - n_att) / k) if k else None,
            }
            | ({"failed": failed} if failed else {})
        )
    bit_exact = all(f.get("rollback_bit_exact") is True for f in run.finish)
    untouched = ctx.target.state_hash() == hash_t
    progress(1.0, "done")
    return SweepResult(
        points=points,
        ranked=ranked,
        score_kind=params.score,
        target=metrics(ev_t),
        donor=metrics(ev_d),
        tir_note=base["tir_note"],
        recovery_note=base["recovery_note"],
        n_swappable=ranking.n_modules,
        k_clipped=clipped,
        rollback_bit_exact=bool(bit_exact),
        target_untouched=bool(untouched),
    )


SWEEP_TOOL = register(
    Tool(
        name="sweep-k",
        code="T8",
        title="Transplant-strength sweep",
        summary="TIR, Recovery and retained perplexity as the number K of swapped top-ranked modules "
        "grows, with the attention/MLP share of the top K.",
        params_cls=SweepParams,
        compute=compute_sweep,
        figure="viz.transplant:sweep_figure",
        page="Transplant",
        same_family=True,
        cells=True,
    )
)
