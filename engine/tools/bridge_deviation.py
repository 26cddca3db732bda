"""T10 Bridge deviation (docs/methods.md, NOT): ``||W_in - I||_F`` and ``||W_out - I||_F`` of the
bridges around an organ inserted at each position ``p``: closed-form bridges (ridge towards the
identity on the workload's texts) and bridges trained from the identity (LM loss), the latter on
growing subsets of the texts to show how the deviation depends on the data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.errors import GraftError
from ..core.params import BridgeRidge, OptimParams, TrainTextsParam, list_items, param
from ..core.progress import Progress
from ..core.train_config import from_params
from ..evaluation.beforeafter import rnd
from ..running.context import ToolContext
from ..running.organ_run import insert_and_prepare, organ_of, parse_positions, require_source, train_texts_of
from ..running.registry import Tool, register
from ..surgery.organ_surgery import Placement


@dataclass(frozen=True)
class BridgeDeviationParams(BridgeRidge, OptimParams, TrainTextsParam):
    positions: str = param("", "Positions p, e.g. '0,2,4'. Empty = every valid position.")
    train_epochs: float = param(
        1.0, "Epochs of training of the trained bridges (0 = closed-form only).", min=0.0, max=1e4
    )
    train_steps: int = param(
        0, "A step budget for the trained bridges instead of the epochs (0 = the epochs decide).", min=0,
        max=100_000,
    )  # fmt: skip
    subsets: str = param(
        "0.5,1", "Shares of the training texts the trained bridges are trained on, e.g. '0.25,0.5,1'."
    )
    sizes: str = param(
        "",
        "Training-set sizes in texts instead of shares, e.g. '100,500,1000,2000' (the paper's); a size "
        "beyond the texts there are is refused.",
    )
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


def _sizes(text: str, n_texts: int) -> list[int]:
    items = list_items(text, "--sizes", "e.g. 100,500,1000")
    try:
        vals = sorted({int(x) for x in items})
    except ValueError:
        raise GraftError(
            f"--sizes must be whole numbers of texts separated by commas, got {text!r}"
        ) from None
    if not vals or vals[0] < 1:
        raise GraftError(f"--sizes must be at least 1, got {text!r}")
    if vals[-1] > n_texts:
        raise GraftError(f"--sizes asks for {vals[-1]:,} texts; the training texts have {n_texts:,}")
    return vals


def compute_bridge_deviation(
    ctx: ToolContext, params: BridgeDeviationParams, progress: Progress
) -> BridgeDeviationResult:
    organ = organ_of(ctx, bridged=True)
    grid = parse_positions(params.positions, ctx.target.arch.n_layers, organ.size)
    trained = params.train_epochs > 0 or params.train_steps > 0
    source = require_source(ctx, organ, progress.sub(0, 0.05))
    texts, _ = train_texts_of(ctx, params.train_texts)
    counts = _sizes(params.sizes, len(texts)) if params.sizes.strip() else None
    fracs = (
        (_subsets(params.subsets) if counts is None else [c / len(texts) for c in counts]) if trained else []
    )
    sizes = counts if counts is not None else [max(1, round(f * len(texts))) for f in fracs]
    config = from_params(params, params.train_epochs or 1.0, params.train_steps) if trained else None
    jobs = [("closed-form", len(texts))] + [("trained", n) for n in sizes]
    points = []
    total = len(grid) * len(jobs)
    for i, p in enumerate(grid):
        for j, (kind, n_use) in enumerate(jobs):
            n = i * len(jobs) + j
            sub = progress.sub(0.05 + 0.95 * n / total, 0.05 + 0.95 * (n + 1) / total)
            use = texts[:n_use]
            ins, _ = insert_and_prepare(
                ctx,
                [Placement(organ, p, "bridged")],
                [source],
                strategy="bridged-closed-form" if kind == "closed-form" else "bridged",
                ridge_alpha=params.ridge_alpha,
                seed=params.seed,
                texts=use,
                progress=sub,
                bridges=config,
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
