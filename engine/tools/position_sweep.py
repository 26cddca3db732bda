"""T9 Position sensitivity (docs/methods.md, NOT): the same organ inserted at every position ``p`` of a
grid by one strategy (direct, direct + recovery, bridged with trained bridges, or closed-form bridges:
``organ_run.STRATEGIES``); perplexity on the concept facts
and the retained set against ``p``, best / worst / mean / variance, and T4's epsilon for the same
``(s, p)`` with the Spearman rank correlation between epsilon and the measured perplexity (did the
pre-surgery check predict the outcome?). ``s`` is the residual index the organ reads in its source
(its start block, or 0 once trained standalone). Every insertion is rolled back before the next."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Any, Optional

from ..core.errors import GraftError
from ..core.params import EvaluationSets, build_params, param
from ..core.progress import Progress, silent
from ..evaluation.beforeafter import load_sets, rnd
from ..running.cells import CellRun, run_cells
from ..running.context import ToolContext
from ..running.organ_run import (
    EVAL_KEYS,
    InsertionParams,
    epsilon_row,
    evaluate_insertion,
    evaluate_target,
    insert_and_prepare,
    load_source,
    organ_of,
    parse_positions,
    require_source,
    short,
    spearman,
    strategy_configs,
    strategy_mode,
    train_texts_of,
    training_card,
)
from ..running.organ_stream import STREAM_NOTE, check_strategy, insert_and_evaluate, streamed_source
from ..running.registry import Tool, register
from ..running.stream_surgery import evaluate_streamed
from ..surgery.organ_surgery import Placement


@dataclass(frozen=True)
class PositionSweepParams(InsertionParams, EvaluationSets):
    positions: str = param("", "Positions p to try, e.g. '0,2,4'. Empty = every valid position.")
    seeds: int = param(
        3,
        "Seeds per position when the strategy trains (seed, seed+1, ...): each point is their mean, "
        "with the standard deviation in 'spread'. One run when nothing is trained.",
        min=1,
        max=100,
    )
    epsilon: bool = param(
        True, "Overlay T4's epsilon for (s, p) (one capture of source and target on the workload)."
    )


@dataclass
class PositionSweepResult:
    s: int  # residual index the organ reads in its source (T4's donor position)
    size: int
    mode: str
    strategy: str  # how the organ went in at each position (organ_run.STRATEGIES)
    training: dict[str, Any]  # the texts and each trained phase's configuration (None parts: none)
    # position, ppl_concept, ppl_retained, task_score (means over seeds), epsilon; with several seeds
    # also spread (sample standard deviation per metric) and per_seed
    points: list[dict[str, Any]]
    baseline: dict[str, Optional[float]]  # T without the organ
    best: Optional[dict[str, Any]]  # lowest concept perplexity
    worst: Optional[dict[str, Any]]
    mean: Optional[float]  # of the concept perplexity over positions
    variance: Optional[float]
    mean_retained: Optional[float]
    variance_retained: Optional[float]
    epsilon_kind: Optional[str]  # "raw" (direct, equal widths) or "bridged"
    spearman_concept: Optional[float]  # rank correlation epsilon vs concept perplexity
    spearman_retained: Optional[float]


def _mean(runs: list[dict[str, Any]]) -> dict[str, Optional[float]]:
    """Each metric's mean over the seeds (None when a seed has none)."""
    out: dict[str, Optional[float]] = {}
    for k in runs[0]:
        vals = [r[k] for r in runs]
        out[k] = rnd(statistics.fmean(vals)) if all(v is not None for v in vals) else None
    return out


def _spread(runs: list[dict[str, Any]]) -> dict[str, Optional[float]]:
    """Each metric's sample standard deviation over the seeds."""
    out: dict[str, Optional[float]] = {}
    for k in runs[0]:
        vals = [r[k] for r in runs]
        out[k] = rnd(statistics.stdev(vals)) if all(v is not None for v in vals) and len(vals) > 1 else None
    return out


def _prepared(ctx: ToolContext, params: PositionSweepParams, progress: Progress) -> dict[str, Any]:
    """What every cell of this process reads, built once per process (``ctx.memo``): the organ,
    its source model, the evaluation sets, the training texts and the trained phases' configs."""
    key = ("position-sweep", repr(params))
    if key not in ctx.memo:
        mode = strategy_mode(params.strategy)
        organ = organ_of(ctx, bridged=mode == "bridged")
        if ctx.target.streamed:  # direct only (checked first): the source serves T4's epsilon alone
            source, note = streamed_source(ctx, organ, progress) if params.epsilon else (None, "")
            if note:
                ctx.meta.setdefault("notes", []).append(note)
            if source is None and params.epsilon:
                raise GraftError(f"T4's epsilon reads the stream the organ read in its source: {note}")
        else:
            source = (
                require_source(ctx, organ, progress)
                if mode == "bridged" or params.epsilon
                else load_source(ctx, organ, progress)[0]
            )
        texts, train_data = train_texts_of(ctx, params.train_texts)
        ctx.memo[key] = {
            "mode": mode,
            "organ": organ,
            "source": source,
            "sets": load_sets(params.concept, params.retained),
            "texts": texts,
            "train_data": train_data,
            "configs": strategy_configs(params),
        }
    return ctx.memo[key]


def position_cell(ctx: ToolContext, shared: dict[str, Any], cell: dict[str, Any], progress: Progress) -> dict:
    """One (position, seed): insert the organ, train what the strategy trains, evaluate, roll back."""
    params = build_params(PositionSweepParams, shared["params"])
    prep = _prepared(ctx, params, silent())
    ins, _ = insert_and_prepare(
        ctx,
        [Placement(prep["organ"], int(cell["position"]), prep["mode"])],
        [prep["source"]],
        strategy=params.strategy,
        ridge_alpha=params.ridge_alpha,
        seed=int(cell["seed"]),
        texts=prep["texts"],
        progress=progress.sub(0, 0.5),
        **prep["configs"],
    )
    try:
        return short(evaluate_insertion(ins, prep["sets"], "graded", 16, progress.sub(0.5, 1.0)))
    finally:  # also on cancel: the target's working copy is the target again
        ins.rollback()


def _streamed_cells(
    ctx: ToolContext, prep: dict[str, Any], cells: list[dict[str, Any]], progress: Progress
) -> CellRun:
    """The cells of a streamed target, here (a Ray worker would read the same folder again for each
    position; on one machine the streamed passes gain nothing from it): each position's organ
    written into a staged copy of the target's folder, evaluated block by block, removed."""
    if (getattr(ctx.options, "ray", "") or "").strip():
        ctx.meta.setdefault("notes", []).append("streamed target: the positions ran here, not on Ray")
    results, files = [], []
    n = len(cells)
    for i, cell in enumerate(cells):
        sub = progress.sub(i / n, (i + 1) / n)
        sub(0.0, f"position {cell['position']} (streamed)")
        ev, summary = insert_and_evaluate(ctx.target, prep["organ"], int(cell["position"]), prep["sets"], sub)
        results.append(short(ev))
        files.append({"position": cell["position"], **summary})
    ctx.meta["streamed_insertions"] = files
    ctx.meta.setdefault("notes", []).append(STREAM_NOTE)
    return CellRun(results)


def compute_position_sweep(
    ctx: ToolContext, params: PositionSweepParams, progress: Progress
) -> PositionSweepResult:
    streamed = ctx.target.streamed
    if streamed:
        check_strategy(params.strategy)
    prep = _prepared(ctx, params, progress.sub(0, 0.05))
    mode, organ, source, sets = prep["mode"], prep["organ"], prep["source"], prep["sets"]
    bridged = mode == "bridged"
    grid = parse_positions(params.positions, ctx.target.arch.n_layers, organ.size)
    eps_row, kind = None, None
    if params.epsilon:
        rows = epsilon_row(ctx, source, organ.input_layer, progress.sub(0.05, 0.25))
        kind = "raw" if (not bridged and rows["raw"] is not None) else "bridged"
        eps_row = rows[kind]
    baseline = short(
        evaluate_streamed(ctx.target, sets, "graded", 16, progress.sub(0.25, 0.3), heldout_concept=True)
        if streamed
        else evaluate_target(ctx.target, sets, "graded", 16, progress.sub(0.25, 0.3))
    )
    card = training_card(params, len(prep["texts"]), prep["train_data"])
    trains = any(v is not None for k, v in card.items() if k != "texts")
    seeds = [params.seed + j for j in range(params.seeds if trains else 1)]
    cells = [{"position": p, "seed": seed} for p in grid for seed in seeds]

    def label(c: dict[str, Any]) -> str:
        return f"position {c['position']}" + (f", seed {c['seed']}" if trains else "")

    run = (
        _streamed_cells(ctx, prep, cells, progress.sub(0.3, 1.0))
        if streamed
        else run_cells(
            ctx, position_cell, {"params": dataclasses.asdict(params)}, cells, progress.sub(0.3, 1.0), label
        )
    )
    points = []
    for i, p in enumerate(grid):
        at = range(i * len(seeds), (i + 1) * len(seeds))
        runs = [run.results[j] for j in at if run.results[j] is not None]
        failed = [run.failed[j] for j in at if j in run.failed]
        if not runs:  # every seed's Ray worker died twice: no numbers at this position
            points.append({"position": p, **dict.fromkeys(EVAL_KEYS), "epsilon": None, "failed": failed})
            continue
        points.append(
            {"position": p, **_mean(runs), "epsilon": None if eps_row is None else rnd(eps_row[p])}
            | ({"spread": _spread(runs), "per_seed": runs} if len(runs) > 1 else {})
            | ({"failed": failed} if failed else {})
        )
    pc = [(pt["position"], pt["ppl_concept"]) for pt in points if pt["ppl_concept"] is not None]
    vals = [v for _, v in pc]
    retained = [pt["ppl_retained"] for pt in points if pt["ppl_retained"] is not None]
    best = min(pc, key=lambda t: t[1], default=None)
    worst = max(pc, key=lambda t: t[1], default=None)
    eps = [pt["epsilon"] for pt in points]
    progress(1.0, "done")
    return PositionSweepResult(
        s=organ.input_layer,
        size=organ.size,
        mode=mode,
        strategy=params.strategy,
        training=card,
        points=points,
        baseline=baseline,
        best=None if best is None else {"position": best[0], "ppl_concept": best[1]},
        worst=None if worst is None else {"position": worst[0], "ppl_concept": worst[1]},
        mean=rnd(statistics.fmean(vals)) if vals else None,
        variance=rnd(statistics.pvariance(vals)) if vals else None,
        mean_retained=rnd(statistics.fmean(retained)) if retained else None,
        variance_retained=rnd(statistics.pvariance(retained)) if retained else None,
        epsilon_kind=kind,
        spearman_concept=rnd(spearman(eps, [pt["ppl_concept"] for pt in points])),
        spearman_retained=rnd(spearman(eps, [pt["ppl_retained"] for pt in points])),
    )


TOOL = register(
    Tool(
        name="position-sweep",
        code="T9",
        title="Position sensitivity",
        summary="Inserts the same organ at every position of a grid by one strategy (direct, direct + "
        "recovery, bridged with trained bridges, or closed-form bridges) and plots concept / retained "
        "perplexity against position, with T4's epsilon overlaid "
        "and their rank correlation.",
        params_cls=PositionSweepParams,
        compute=compute_position_sweep,
        figure="viz.organs:position_figure",
        page="Organs",
        same_family=True,
        needs=(("organ", "target"),),
        run_label="Run T9",
        cells=True,
        streams=True,  # direct insertions written into staged copies of the target's folder
        edits=True,
    )
)
