"""Standalone organ training (docs/methods.md operation 2, NOT): frozen embeddings -> organ -> frozen
final norm and head, causal LM loss on a concept set or any text file (:mod:`engine.surgery.organ_train`).
The trained organ is a new checkpoint whose card records the training configuration and metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from ..core.errors import GraftError
from ..core.params import OptimParams, param
from ..core.progress import Progress
from ..core.train_config import from_params
from ..running.context import ToolContext
from ..running.organ_run import default_out, load_source, organ_of, training_texts
from ..running.registry import Tool, register
from ..surgery.organ import load_organ, save_organ
from ..surgery.organ_train import train_organ


@dataclass(frozen=True)
class OrganTrainParams(OptimParams):
    concept: str = param(
        "",
        'Training texts: concept set or {"text"} JSONL (or .json array), or a text file (one text a line). '
        "Empty = the bundled concept set.",
        path="in",
    )
    epochs: float = param(
        5.0, "Training epochs: passes over the training texts (the paper: 5).", min=0.0, max=1e4
    )
    steps: int = param(
        0, "A step budget instead of the epochs (0 = the epochs decide).", min=0, max=1_000_000
    )
    seed: int = param(
        0, "Seed of the batch order (the run is deterministic for a seed).", min=0, max=2**31 - 1
    )
    max_length: int = param(128, "Tokens kept per text.", min=4, max=4096)
    out: str = param(
        "",
        "Folder for the trained organ. Empty = the organ's folder name + '-trained' beside it in "
        "<GRAFT_HOME>/organs.",
        path="out_dir",
    )


@dataclass
class OrganTrainResult:
    organ: dict[str, Any]  # the trained checkpoint's organ.json
    path: str
    source: str
    losses: list[float]
    metrics: dict[str, Optional[float]]
    data: dict[str, Any]


def compute_organ_train(ctx: ToolContext, params: OrganTrainParams, progress: Progress) -> OrganTrainResult:
    organ = organ_of(ctx)
    texts, data = training_texts(params.concept)
    progress(0.02, f"loading the organ's source {organ.source_ref}")
    source, note = load_source(ctx, organ, progress.sub(0.02, 0.1))
    if source is None:
        raise GraftError(
            f"standalone training runs the organ between its source's embeddings and head: {note}"
        )
    if note:
        ctx.meta.setdefault("notes", []).append(note)
    config = from_params(params, params.epochs, params.steps, params.max_length)
    t0 = time.perf_counter()
    trained, losses, metrics = train_organ(
        source, organ, texts, config, seed=params.seed, data=data, progress=progress.sub(0.1, 0.9)
    )
    ctx.meta["train_seconds"] = round(time.perf_counter() - t0, 2)  # timings go in meta, not the result
    ctx.meta["train_steps_seconds"] = metrics.pop("train_seconds")  # the optimiser steps alone
    out = params.out.strip() or str(default_out(f"{organ.name}-trained"))
    progress(0.92, f"writing {out}")
    path = save_organ(trained, out)
    back = load_organ(path)
    progress(1.0, "done")
    return OrganTrainResult(
        organ=back.card, path=str(path), source=source.spec.ref, losses=losses, metrics=metrics, data=data
    )


TOOL = register(
    Tool(
        name="organ-train",
        code="OP2.2",
        title="Standalone organ training",
        summary="Trains an organ between its source's frozen embeddings and frozen final norm + head on a "
        "concept set or text file, with a step budget; writes a new organ checkpoint.",
        params_cls=OrganTrainParams,
        compute=compute_organ_train,
        figure="viz.organs:train_figure",
        page="Organs",
        needs=(("organ",),),
        uses_workload=False,
        run_label="Train organ",
    )
)
