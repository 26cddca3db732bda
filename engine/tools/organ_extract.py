"""Organ extraction (docs/methods.md operation 2): ``k`` contiguous blocks of the donor from block ``s``,
saved as an organ checkpoint (``organ.safetensors`` + ``organ.json``, :mod:`engine.surgery.organ`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.params import param
from ..core.progress import Progress
from ..running.context import ToolContext
from ..running.organ_run import default_out
from ..running.registry import Tool, register
from ..surgery.organ import default_start, extract_organ, load_organ, save_organ


@dataclass(frozen=True)
class OrganExtractParams:
    start: int = param(-1, "First donor block s of the organ; -1 = floor(L/3).", min=-1, max=100_000)
    size: int = param(3, "Number of contiguous blocks k.", min=1, max=1000)
    out: str = param(
        "",
        "Folder to write the organ checkpoint to. Empty = <GRAFT_HOME>/organs/<donor>-s<S>-k<K>.",
        path="out_dir",
    )


@dataclass
class OrganExtractResult:
    organ: dict[str, Any]  # the checkpoint's organ.json
    path: str
    n_layers: int  # blocks of the donor
    n_tensors: int
    bytes: int
    bit_exact_reload: bool  # the written checkpoint reads back tensor for tensor


def compute_organ_extract(
    ctx: ToolContext, params: OrganExtractParams, progress: Progress
) -> OrganExtractResult:
    L = ctx.donor.arch.n_layers
    s = default_start(L) if params.start < 0 else params.start
    progress(0.1, f"copying blocks {s}..{s + params.size - 1} of {ctx.donor.label}")
    organ = extract_organ(ctx.donor, s, params.size)
    out = params.out.strip() or str(default_out(f"{ctx.donor.label}-s{s}-k{params.size}"))
    progress(0.6, f"writing {out}")
    path = save_organ(organ, out)
    back = load_organ(path)
    exact = back.tensors.keys() == organ.tensors.keys() and all(
        back.tensors[k].dtype == organ.tensors[k].dtype and torch.equal(back.tensors[k], organ.tensors[k])
        for k in organ.tensors
    )
    progress(1.0, "done")
    return OrganExtractResult(
        organ=back.card,
        path=str(path),
        n_layers=L,
        n_tensors=len(organ.tensors),
        bytes=organ.nbytes,
        bit_exact_reload=bool(exact),
    )


TOOL = register(
    Tool(
        name="organ-extract",
        code="OP2.1",
        title="Organ extraction",
        summary="Copies k contiguous blocks of the donor from block s into an organ checkpoint "
        "(safetensors + organ.json with the source, layers, architecture and T1 signature).",
        params_cls=OrganExtractParams,
        compute=compute_organ_extract,
        figure="viz.organs:extract_figure",
        page="Organs",
        needs=(("donor",),),
        uses_workload=False,
        run_label="Extract organ",
        streams=True,  # a streamed donor reads just the organ's blocks
    )
)
