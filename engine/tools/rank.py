"""T7 ``rank-modules``. For every linear module present in both models with identical stored
shape, both models read the workload and the module's output rows are captured (token level:
the same tokenizer is required). With ``o_D``, ``o_T`` the donor's and the target's output on
the same token,

    score = mean_tokens ||o_D - o_T||_2 / mean_tokens ||o_T||_2,

and the same ratio restricted to each text gives per-text scores. A module is in a text's top
decile when its per-text score ranks within the first ``ceil(top_decile * M)`` of the ``M``
modules (ties broken by block order); consistency = share of texts where that happens.

Both models must share family and tokenizer (:func:`engine.transplant.check_swap_pair`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..beforeafter import rnd
from ..context import ToolContext
from ..errors import GraftError
from ..params import param
from ..progress import Progress
from ..registry import Tool, register
from ..transplant import check_swap_pair, swappable_modules


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
         "score": rnd(score[i]), "consistency": rnd(consistency[i])}
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


RANK_TOOL = register(Tool(
    name="rank-modules", code="T7", title="Activation-difference module ranking",
    summary="Ranks every linear module shared by donor and target by how differently it responds to the workload: mean ||o_D − o_T|| / mean ||o_T||, with per-text consistency.",
    params_cls=RankParams, compute=compute_rank, figure="viz.transplant:rank_figure", page="Transplant", same_family=True,
))
