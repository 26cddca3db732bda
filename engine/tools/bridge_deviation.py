"""T10 Bridge deviation (docs/methods.md, NOT): ``||W_in - I||_F`` and ``||W_out - I||_F`` of the
bridges around an organ inserted at each position ``p``: closed-form bridges (ridge towards the
identity on the workload's texts) and bridges trained from the identity (LM loss), the latter on
growing subsets of the texts to show how the deviation depends on the data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..core.errors import GraftError
from ..core.params import BridgeRidge, OptimParams, TrainTextsParam, build_params, list_items, param
from ..core.progress import Progress, silent
from ..core.train_config import from_params
from ..evaluation.beforeafter import rnd
from ..running.cells import run_cells
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


def _prepared(ctx: ToolContext, params: BridgeDeviationParams, progress: Progress) -> dict[str, Any]:
    """The organ, its source, the training texts and the trained bridges' config, once per process."""
    key = ("bridge-deviation", repr(params))
    if key not in ctx.memo:
        organ = organ_of(ctx, bridged=True)
        trained = params.train_epochs > 0 or params.train_steps > 0
        ctx.memo[key] = {
            "organ": organ,
            "source": require_source(ctx, organ, progress),
            "texts": train_texts_of(ctx, params.train_texts)[0],
            "trained": trained,
            "config": from_params(params, params.train_epochs or 1.0, params.train_steps)
            if trained
            else None,
        }
    return ctx.memo[key]


def deviation_cell(
    ctx: ToolContext, shared: dict[str, Any], cell: dict[str, Any], progress: Progress
) -> dict:
    """One (position, bridge kind, number of texts): insert bridged, fit or train, measure, roll back."""
    params = build_params(BridgeDeviationParams, shared["params"])
    prep = _prepared(ctx, params, silent())
    use = prep["texts"][: int(cell["n_texts"])]
    ins, _ = insert_and_prepare(
        ctx,
        [Placement(prep["organ"], int(cell["position"]), "bridged")],
        [prep["source"]],
        strategy="bridged-closed-form" if cell["bridge"] == "closed-form" else "bridged",
        ridge_alpha=params.ridge_alpha,
        seed=params.seed,
        texts=use,
        progress=progress,
        bridges=prep["config"],
    )
    try:
        dev = ins.deviations()[0] or {}
    finally:
        ins.rollback()
    return {"dev_in": rnd(dev.get("in")), "dev_out": rnd(dev.get("out")), "n_texts": len(use)}


def compute_bridge_deviation(
    ctx: ToolContext, params: BridgeDeviationParams, progress: Progress
) -> BridgeDeviationResult:
    prep = _prepared(ctx, params, progress.sub(0, 0.05))
    organ, texts = prep["organ"], prep["texts"]
    grid = parse_positions(params.positions, ctx.target.arch.n_layers, organ.size)
    counts = _sizes(params.sizes, len(texts)) if params.sizes.strip() else None
    fracs = (
        (_subsets(params.subsets) if counts is None else [c / len(texts) for c in counts])
        if prep["trained"]
        else []
    )
    sizes = counts if counts is not None else [max(1, round(f * len(texts))) for f in fracs]
    jobs = [("closed-form", len(texts))] + [("trained", n) for n in sizes]
    cells = [{"position": p, "bridge": kind, "n_texts": n_use} for p in grid for kind, n_use in jobs]
    run = run_cells(
        ctx,
        deviation_cell,
        {"params": dataclasses.asdict(params)},
        cells,
        progress.sub(0.05, 1.0),
        lambda c: f"position {c['position']}, {c['bridge']} bridges on {c['n_texts']} texts",
    )
    points = []
    for i, (cell, got) in enumerate(zip(cells, run.results)):
        got = got or {"dev_in": None, "dev_out": None, "n_texts": cell["n_texts"]}  # its worker died twice
        point = {"position": cell["position"], "dev_in": got["dev_in"], "dev_out": got["dev_out"]}
        point |= {"bridge": cell["bridge"], "n_texts": got["n_texts"]}
        points.append(point | ({"failed": run.failed[i]} if i in run.failed else {}))
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
        cells=True,
    )
)
