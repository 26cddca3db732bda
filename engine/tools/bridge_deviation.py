"""T10 Bridge deviation (docs/methods.md, NOT): ``||W_in - I||_F`` and ``||W_out - I||_F`` of the
bridges around an organ inserted at each position ``p``: closed-form bridges (ridge towards the
identity on the workload's texts) and bridges trained from the identity (LM loss), the latter on
growing subsets of the texts to show how the deviation depends on the data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.errors import GraftError
from ..core.params import BridgeRidge, list_items, param
from ..core.progress import Progress
from ..evaluation.beforeafter import rnd
from ..running.context import ToolContext
from ..running.organ_run import insert_and_prepare, organ_of, parse_positions, require_source
from ..running.registry import Tool, register
from ..surgery.organ_surgery import Placement


@dataclass(frozen=True)
class BridgeDeviationParams(BridgeRidge):
    positions: str = param("", "Positions p, e.g. '0,2,4'. Empty = every valid position.")
    train_steps: int = param(
        10, "Training steps of the trained bridges (0 = closed-form only).", min=0, max=100_000
    )
    subsets: str = param(
        "0.5,1", "Shares of the workload's texts the trained bridges are trained on, e.g. '0.25,0.5,1'."
    )
    lr: float = param(1e-3, "Adam learning rate of the trained bridges.", min=1e-8, max=1.0)
    seed: int = param(0, "Seed of the training batch order.", min=0, max=2**31 - 1)


@dataclass
class BridgeDeviationResult:
    s: int
    size: int
    points: list[dict[str, Any]]  # position, dev_in, dev_out, bridge ("closed-form" | "trained"), n_texts
    n_texts: int
    subsets: list[float]


def _subsets(text: str) -> list[float]:
    items = list_items(text, "--subsets", "the default 0.5,1")
    if not items:
        items = ["0.5", "1"]
    try:
        vals = sorted({float(x) for x in items})
    except ValueError:
        raise GraftError(f"--subsets must be numbers in (0, 1] separated by commas, got {text!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise GraftError(f"--subsets must be numbers in (0, 1], got {text!r}")
    return vals


def compute_bridge_deviation(
    ctx: ToolContext, params: BridgeDeviationParams, progress: Progress
) -> BridgeDeviationResult:
    organ = organ_of(ctx, bridged=True)
    grid = parse_positions(params.positions, ctx.target.arch.n_layers, organ.size)
    fracs = _subsets(params.subsets) if params.train_steps > 0 else []
    source = require_source(ctx, organ, progress.sub(0, 0.05))
    texts = list(ctx.workload.texts)
    jobs = [("closed-form", 1.0)] + [("trained", f) for f in fracs]
    points = []
    total = len(grid) * len(jobs)
    for i, p in enumerate(grid):
        for j, (kind, frac) in enumerate(jobs):
            n = i * len(jobs) + j
            sub = progress.sub(0.05 + 0.95 * n / total, 0.05 + 0.95 * (n + 1) / total)
            use = texts[: max(1, round(frac * len(texts)))]
            ins, _ = insert_and_prepare(
                ctx,
                [Placement(organ, p, "bridged")],
                [source],
                bridge=kind,
                bridge_steps=max(params.train_steps, 1),
                ridge_alpha=params.ridge_alpha,
                recovery_steps=0,
                recovery="organs+neighbours",
                lr=params.lr,
                seed=params.seed,
                texts=use,
                progress=sub,
            )
            dev = ins.deviations()[0] or {}
            ins.rollback()
            points.append(
                {
                    "position": p,
                    "dev_in": rnd(dev.get("in")),
                    "dev_out": rnd(dev.get("out")),
                    "bridge": kind,
                    "n_texts": len(use),
                }
            )
    progress(1.0, "done")
    return BridgeDeviationResult(
        s=organ.input_layer, size=organ.size, points=points, n_texts=len(texts), subsets=fracs
    )


TOOL = register(
    Tool(
        name="bridge-deviation",
        code="T10",
        title="Bridge deviation",
        summary="||W_in - I||_F and ||W_out - I||_F of the bridges around an organ at each position: "
        "closed-form bridges and bridges trained from the identity on growing subsets of the texts.",
        params_cls=BridgeDeviationParams,
        compute=compute_bridge_deviation,
        figure="viz.organs:deviation_figure",
        page="Organs",
        same_family=True,
        needs=(("organ", "target"),),
        run_label="Run T10",
    )
)
