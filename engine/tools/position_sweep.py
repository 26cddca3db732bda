"""T9 Position sensitivity (docs/methods.md, NOT): the same organ inserted at every position ``p`` of a
grid (direct or bridged, optionally after ``n`` recovery steps); perplexity on the concept facts
and the retained set against ``p``, best / worst / mean / variance, and T4's epsilon for the same
``(s, p)`` with the Spearman rank correlation between epsilon and the measured perplexity (did the
pre-surgery check predict the outcome?). ``s`` is the residual index the organ reads in its source
(its start block, or 0 once trained standalone). Every insertion is rolled back before the next."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Optional

from ..core.params import BridgeRidge, EvaluationSets, param
from ..core.progress import Progress
from ..evaluation.beforeafter import load_sets, rnd
from ..running.context import ToolContext
from ..running.organ_run import (
    BRIDGES,
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
)
from ..running.registry import Tool, register
from ..surgery.organ_surgery import MODES, Placement


@dataclass(frozen=True)
class PositionSweepParams(BridgeRidge, EvaluationSets):
    positions: str = param("", "Positions p to try, e.g. '0,2,4'. Empty = every valid position.")
    mode: str = param("direct", "direct replacement or bridged insertion at each position.", choices=MODES)
    bridge: str = param(
        "closed-form",
        "Bridged mode: closed-form, trained (from identity) or closed-form+trained.",
        choices=BRIDGES,
    )
    bridge_steps: int = param(20, "Training steps of trained bridges.", min=1, max=100_000)
    recovery_steps: int = param(
        0,
        "Recovery steps (organ + neighbouring blocks) at each position before evaluating.",
        min=0,
        max=100_000,
    )
    lr: float = param(1e-4, "Adam learning rate of bridge training and recovery.", min=1e-8, max=1.0)
    seed: int = param(0, "Seed of the training batch order.", min=0, max=2**31 - 1)
    epsilon: bool = param(
        True, "Overlay T4's epsilon for (s, p) (one capture of source and target on the workload)."
    )


@dataclass
class PositionSweepResult:
    s: int  # residual index the organ reads in its source (T4's donor position)
    size: int
    mode: str
    points: list[dict[str, Any]]  # position, ppl_concept, ppl_retained, task_score, epsilon
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


def compute_position_sweep(
    ctx: ToolContext, params: PositionSweepParams, progress: Progress
) -> PositionSweepResult:
    organ = organ_of(ctx, bridged=params.mode == "bridged")
    sets = load_sets(params.concept, params.retained)
    grid = parse_positions(params.positions, ctx.target.arch.n_layers, organ.size)
    bridged = params.mode == "bridged"
    source = (
        require_source(ctx, organ, progress.sub(0, 0.05))
        if bridged or params.epsilon
        else load_source(ctx, organ, progress.sub(0, 0.05))[0]
    )
    eps_row, kind = None, None
    if params.epsilon:
        rows = epsilon_row(ctx, source, organ.input_layer, progress.sub(0.05, 0.25))
        kind = "raw" if (not bridged and rows["raw"] is not None) else "bridged"
        eps_row = rows[kind]
    baseline = short(evaluate_target(ctx.target, sets, "graded", 16, progress.sub(0.25, 0.3)))
    texts = list(ctx.workload.texts)
    points = []
    for i, p in enumerate(grid):
        sub = progress.sub(0.3 + 0.7 * i / len(grid), 0.3 + 0.7 * (i + 1) / len(grid))
        sub(0.0, f"position {p} ({i + 1}/{len(grid)})")
        ins, _ = insert_and_prepare(
            ctx,
            [Placement(organ, p, params.mode)],
            [source],
            bridge=params.bridge,
            bridge_steps=params.bridge_steps,
            ridge_alpha=params.ridge_alpha,
            recovery_steps=params.recovery_steps,
            recovery="organs+neighbours",
            lr=params.lr,
            seed=params.seed,
            texts=texts,
            progress=sub.sub(0, 0.5),
        )
        ev = short(evaluate_insertion(ins, sets, "graded", 16, sub.sub(0.5, 1.0)))
        ins.rollback()
        points.append({"position": p, **ev, "epsilon": None if eps_row is None else rnd(eps_row[p])})
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
        mode=params.mode,
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
        summary="Inserts the same organ at every position of a grid (direct or bridged, optionally with "
        "recovery) and plots concept / retained perplexity against position, with T4's epsilon overlaid "
        "and their rank correlation.",
        params_cls=PositionSweepParams,
        compute=compute_position_sweep,
        figure="viz.organs:position_figure",
        page="Organs",
        same_family=True,
        needs=(("organ", "target"),),
        run_label="Run T9",
    )
)
