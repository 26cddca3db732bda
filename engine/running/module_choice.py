"""Which modules a module swap takes: T7's activation-difference ranking (:func:`rank_modules`) and
the choice shared by every tool that runs a swap itself (:func:`choose_modules`: the names given, or
the top K of the ranking).

T7 scores each linear module ``m`` that donor and target share by the relative difference of its
outputs on the same tokens: ``score(m) = mean_t ||o_D(t) - o_T(t)|| / mean_t ||o_T(t)||``, and its
consistency as the share of texts in whose own top decile it falls (docs/methods.md, T7)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.errors import GraftError
from ..core.jsonsafe import rnd
from ..core.params import list_items
from ..core.progress import Progress
from ..surgery.transplant import check_swap_pair, swappable_modules
from .context import ToolContext


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
        raise GraftError(
            "donor and target tokenised the workload differently: token-level module outputs cannot be "
            "compared"
        )
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
        {
            "name": mods[i].name,
            "layer": mods[i].layer,
            "canonical": mods[i].canonical,
            "kind": mods[i].kind,
            "score": rnd(score[i]),
            "consistency": rnd(consistency[i]),
        }
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


def parse_modules(text: str) -> list[str]:
    return list(dict.fromkeys(list_items(text, "--modules", "T7's top --k")))


def choose_modules(
    ctx: ToolContext, k: int, modules: str, progress: Progress
) -> tuple[list[dict[str, Any]], bool]:
    """The modules a swap takes: the names in ``modules`` (comma-separated) when given, else the
    top ``k`` of the T7 ranking. Returns (rows of name, layer, kind, score; whether chosen by hand).
    Used by every tool that runs a swap itself (T11, T12, T13)."""
    check_swap_pair(ctx.donor, ctx.target)
    swappable, _ = swappable_modules(ctx.donor, ctx.target)
    explicit = parse_modules(modules)
    if explicit:
        chosen = [{"name": n, "layer": None, "kind": None, "score": None} for n in explicit]
        by_name = {m.name: m for m in swappable}
        for row in chosen:
            if row["name"] in by_name:
                row.update(layer=by_name[row["name"]].layer, kind=by_name[row["name"]].kind)
        progress(1.0, "modules chosen by hand")
    else:
        ranking = rank_modules(ctx, progress)
        chosen = [{key: m[key] for key in ("name", "layer", "kind", "score")} for m in ranking.modules[:k]]
    return chosen, bool(explicit)
