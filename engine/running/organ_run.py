"""What the organ tools share: the organ and its source model, default folders, training texts,
one insertion evaluated end to end, the T4 epsilon for ``(s, p)`` and a rank correlation."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..core.data import ConceptSet, load_workload
from ..core.errors import GraftError
from ..core.params import list_items
from ..core.paths import graft_home
from ..core.progress import Progress
from ..evaluation.beforeafter import evaluate_shared, metrics
from ..evaluation.evalcache import evaluate_model
from ..loading.models import LoadedModel, ModelSpec
from ..surgery.organ import Organ, check_fits, load_organ
from ..surgery.organ_surgery import OrganInsertion, Placement
from .bridge_fit import BridgeParams, compute_bridge
from .context import ToolContext

BRIDGES = ("closed-form", "trained", "closed-form+trained")
RECOVERY = ("organs+neighbours", "bridges-then-organs")
EVAL_KEYS = ("ppl_concept", "ppl_retained", "task_score")


def organ_of(ctx: Any, bridged: bool = False) -> Organ:
    """The run's organ checkpoint, checked against the recipient (when the tool has one) before any
    work; an organ of another width fits only ``bridged``."""
    organ = load_organ(ctx.organ)
    if ctx.target is not None:
        check_fits(organ, ctx.target, bridged=bridged)
    return organ


def organs_dir() -> Path:
    return graft_home() / "organs"


def default_out(label: str) -> Path:
    return organs_dir() / re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("_")


def load_source(ctx: Any, organ: Organ, progress: Progress) -> tuple[Optional[LoadedModel], str]:
    """The organ's source model from the store, and a note ('' when it loads and hashes as recorded)."""
    try:
        spec = ModelSpec.parse(organ.source_ref)
        src = ctx.store.get(spec, ctx.options.device, ctx.options.dtype, progress)
    except GraftError as e:
        return None, f"the organ's source {organ.source_ref} cannot be loaded ({e})"
    if src.state_hash() != organ.card["source"].get("weight_hash"):
        return src, (
            f"the organ's source {src.label} no longer hashes as when the organ was extracted "
            "(other weights or dtype)"
        )
    return src, ""


def require_source(ctx: Any, organ: Organ, progress: Progress) -> LoadedModel:
    src, note = load_source(ctx, organ, progress)
    if src is None:
        raise GraftError(f"bridges are fitted on the stream the organ read in its source: {note}")
    if note:
        ctx.meta.setdefault("notes", []).append(note)
    return src


def training_texts(path: str) -> tuple[list[str], dict[str, Any]]:
    """Texts of a workload file (:func:`engine.core.data.load_workload`: concept set, {"text"} JSONL or
    .json, plain text);
    empty = the bundled concept set."""
    from ..core.data import builtin_concept_path

    wl = load_workload(path or str(builtin_concept_path()))
    return list(wl.texts), {"name": wl.name, "sha256": wl.sha256, "n_texts": len(wl.texts)}


def parse_positions(text: str, n_layers: int, size: int) -> list[int]:
    valid = list(range(0, n_layers - size + 1))
    items = [x for item in list_items(text, "--positions", "every valid position") for x in item.split()]
    if not items:
        return valid
    try:
        got = sorted({int(x) for x in items})
    except ValueError:
        raise GraftError(f"--positions must be integers separated by commas, got {text!r}") from None
    if not got:
        raise GraftError(f"--positions names no position ({text!r}); leave it empty for every valid one")
    bad = [p for p in got if p not in valid]
    if bad:
        raise GraftError(
            f"position(s) {bad} out of range: an organ of {size} blocks fits at 0..{n_layers - size}"
        )
    return got


def insert_and_prepare(
    ctx: Any,
    placements: Sequence[Placement],
    sources: Sequence[Optional[LoadedModel]],
    *,
    bridge: str,
    bridge_steps: int,
    ridge_alpha: float,
    recovery_steps: int,
    recovery: str,
    lr: float,
    seed: int,
    texts: Sequence[str],
    progress: Progress,
) -> tuple[OrganInsertion, dict[str, Any]]:
    """Build, apply, fit / train the bridges and run recovery; returns the insertion and the losses."""
    ins = OrganInsertion(ctx.target, placements)
    ins.hash_before()
    t0 = time.perf_counter()
    ins.apply()
    log: dict[str, Any] = {"bridge_losses": [], "recovery_losses": [], "insert_seconds": None}
    if ins.bridged:
        if bridge in ("closed-form", "closed-form+trained"):
            ins.fit_bridges(sources, texts, alpha=ridge_alpha, progress=progress.sub(0, 0.4))  # type: ignore[arg-type]
        if bridge in ("trained", "closed-form+trained"):
            log["bridge_losses"] = ins.train(
                "bridges", texts, steps=bridge_steps, lr=lr, seed=seed, progress=progress.sub(0.4, 0.6)
            )
    log["insert_seconds"] = time.perf_counter() - t0
    if recovery_steps > 0:
        p = progress.sub(0.6, 1.0)
        if recovery == "bridges-then-organs" and ins.bridged:
            half = recovery_steps // 2
            log["recovery_losses"] = ins.train(
                "bridges", texts, steps=half, lr=lr, seed=seed, progress=p.sub(0, 0.5)
            )
            log["recovery_losses"] += ins.train(
                "bridges+organs",
                texts,
                steps=recovery_steps - half,
                lr=lr,
                seed=seed + 1,
                progress=p.sub(0.5, 1),
            )
        else:
            what = "organs" if recovery == "bridges-then-organs" else "organs+neighbours"
            log["recovery_losses"] = ins.train(
                what, texts, steps=recovery_steps, lr=lr, seed=seed, progress=p
            )
    progress(1.0, "organ in place")
    return ins, log


def evaluate_insertion(
    ins: OrganInsertion,
    sets: tuple[ConceptSet, ConceptSet],
    score: str,
    max_new_tokens: int,
    progress: Progress,
    exact: bool = False,
) -> dict[str, Any]:
    return evaluate_model(
        ins.working,
        ins.target.tokenizer,
        sets[0],
        sets[1],
        score=score,
        exact=exact or score == "exact",
        max_new_tokens=max_new_tokens,
        state_hash=ins.weight_hash(),
        progress=progress,
    )


def evaluate_target(
    target: LoadedModel,
    sets: tuple[ConceptSet, ConceptSet],
    score: str,
    max_new_tokens: int,
    progress: Progress,
    exact: bool = False,
) -> dict[str, Any]:
    return evaluate_shared(
        target, sets, score, max_new_tokens, progress, target.state_hash(), exact=exact or score == "exact"
    )


def short(ev: dict[str, Any]) -> dict[str, Optional[float]]:
    m = metrics(ev)
    return {k: m[k] for k in EVAL_KEYS}


def epsilon_row(ctx: Any, source: LoadedModel, s: int, progress: Progress) -> dict[str, Any]:
    """T4's epsilon for donor position ``s`` against every target position (raw when widths match)."""
    sub = ToolContext(source, ctx.target, ctx.workload, ctx.options, ctx.captures, store=ctx.store)
    res = compute_bridge(sub, BridgeParams(), progress)
    ctx.meta.setdefault("notes", []).extend(
        n for n in sub.meta.get("notes", []) if n not in ctx.meta.get("notes", [])
    )
    return {"raw": None if res.epsilon_raw is None else res.epsilon_raw[s], "bridged": res.epsilon_bridged[s]}


def _ranks(x: Sequence[float]) -> torch.Tensor:
    t = torch.tensor(x, dtype=torch.float64)
    order = torch.argsort(t)
    r = torch.empty_like(t)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    for v in torch.unique(t):  # ties share their mean rank
        m = t == v
        r[m] = r[m].mean()
    return r


def spearman(x: Sequence[Optional[float]], y: Sequence[Optional[float]]) -> Optional[float]:
    """Spearman rank correlation over the pairs where both are numbers; None below 3 pairs or when
    either side is constant."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pairs) < 3:
        return None
    rx, ry = _ranks([a for a, _ in pairs]), _ranks([b for _, b in pairs])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return None if den == 0 else float((rx @ ry) / den)
