"""What the organ tools share: the organ and its source model, default folders, training texts,
one insertion evaluated end to end, the T4 epsilon for ``(s, p)`` and a rank correlation."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..core.data import ConceptSet, load_workload
from ..core.errors import GraftError
from ..core.params import BridgeRidge, OptimParams, TrainTextsParam, list_items, param
from ..core.paths import graft_home
from ..core.progress import Progress
from ..core.train_config import TrainConfig, from_params
from ..evaluation.beforeafter import evaluate_shared, metrics
from ..evaluation.evalcache import evaluate_model
from ..loading.models import LoadedModel, ModelSpec
from ..surgery.organ import Organ, check_fits, load_organ
from ..surgery.organ_surgery import OrganInsertion, Placement
from .bridge_fit import BridgeParams, compute_bridge
from .context import ToolContext

# How an organ goes in (docs/methods.md, operation 2), and what each trains.
STRATEGIES = {
    "direct": "direct replacement, nothing trained",
    "direct+recovery": "direct replacement, then the organ and its neighbouring blocks p-1 and p+k trained "
    "(the NOT paper's direct strategy)",
    "bridged": "bridges from the identity trained by LM loss, first alone, then with the organ (the NOT "
    "paper's bridged strategy)",
    "bridged-closed-form": "closed-form ridge bridges fitted towards the identity, nothing trained "
    "(Graft's training-free variant)",
    "bridged-closed-form+trained": "closed-form bridges, then trained as in bridged (Graft's variant)",
    "control": "no organ: the target's own blocks p-1 .. p+k fine-tuned in place with the recovery budget "
    "(the control: a gain is the transplant's only where it beats this)",
}
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
    recorded = organ.card["source"].get("weight_hash")
    if recorded is None:
        return src, f"the organ was extracted from {src.label} streamed: its weights were not hashed then"
    if src.state_hash() != recorded:
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


@dataclasses.dataclass(frozen=True)
class InsertionParams(BridgeRidge, OptimParams, TrainTextsParam):
    """How an organ goes in and what is trained (organ-insert, T9); the optimiser is OptimParams'."""

    strategy: str = param(
        "direct",
        "How the organ goes in: " + "; ".join(f"{k}: {v}" for k, v in STRATEGIES.items()) + ".",
        choices=tuple(STRATEGIES),
    )
    recovery_epochs: float = param(
        3.0,
        "direct+recovery and control: epochs training the organ (the own blocks for control) and blocks "
        "p-1, p+k (the paper: 3-5).",
        min=0.0,
        max=1e4,
    )
    bridge_epochs: float = param(
        1.0, "bridged: epochs training the bridges alone first (the paper: 1).", min=0.0, max=1e4
    )
    joint_epochs: float = param(
        2.0,
        "bridged: epochs training bridges and organ together after that (the paper: 2).",
        min=0.0,
        max=1e4,
    )
    seed: int = param(0, "Seed of the training batch order.", min=0, max=2**31 - 1)


def strategy_mode(strategy: str) -> str:
    """The placement mode a strategy inserts with: "bridged" or "direct"."""
    if strategy not in STRATEGIES:
        raise GraftError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return "bridged" if strategy.startswith("bridged") else "direct"


def insert_and_prepare(
    ctx: Any,
    placements: Sequence[Placement],
    sources: Sequence[Optional[LoadedModel]],
    *,
    strategy: str,
    ridge_alpha: float,
    seed: int,
    texts: Sequence[str],
    progress: Progress,
    recovery: Optional[TrainConfig] = None,
    bridges: Optional[TrainConfig] = None,
    joint: Optional[TrainConfig] = None,
) -> tuple[OrganInsertion, dict[str, Any]]:
    """Build and apply the insertion, then what ``strategy`` trains: ``recovery`` (organ and
    neighbours) for direct+recovery; ``bridges`` (bridges alone) then ``joint`` (bridges and organ)
    for bridged, either skipped when None. Returns the insertion and the losses."""
    strategy_mode(strategy)
    if strategy == "control":  # the same k + 2 blocks, the target's own: nothing transplanted
        from ..surgery.organ import extract_organ

        placements = [
            Placement(extract_organ(ctx.target, pl.position, pl.organ.size), pl.position, "direct")
            for pl in placements
        ]
    ins = OrganInsertion(ctx.target, placements)
    ins.hash_before()
    t0 = time.perf_counter()
    ins.apply()
    log: dict[str, Any] = {
        "bridge_losses": [],
        "recovery_losses": [],
        "insert_seconds": None,
        "train_seconds": 0.0,
    }
    if strategy.startswith("bridged-closed-form"):
        ins.fit_bridges(sources, texts, alpha=ridge_alpha, progress=progress)  # type: ignore[arg-type]
    log["insert_seconds"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    if strategy in ("bridged", "bridged-closed-form+trained"):
        if bridges is not None:
            log["bridge_losses"] = ins.train(
                "bridges", texts, bridges, seed=seed, progress=progress.sub(0, 0.4)
            )
        if joint is not None:
            log["recovery_losses"] = ins.train(
                "bridges+organs", texts, joint, seed=seed + 1, progress=progress.sub(0.4, 1)
            )
    elif strategy in ("direct+recovery", "control") and recovery is not None:
        log["recovery_losses"] = ins.train("organs+neighbours", texts, recovery, seed=seed, progress=progress)
    log["train_seconds"] = time.perf_counter() - t1
    progress(1.0, "organ in place")
    return ins, log


BRIDGE_KIND = {
    "bridged": "trained (from the identity)",
    "bridged-closed-form": "closed-form (training-free)",
    "bridged-closed-form+trained": "closed-form, then trained",
}


def training_card(params: Any, n_texts: int, data: dict[str, Any]) -> dict[str, Any]:
    """What an insertion trained, for the result and the surgery card (None parts: not trained)."""
    cfgs = strategy_configs(params)
    used = {
        "direct": (),
        "direct+recovery": ("recovery",),
        "bridged": ("bridges", "joint"),
        "bridged-closed-form": (),
        "bridged-closed-form+trained": ("bridges", "joint"),
        "control": ("recovery",),
    }[params.strategy]
    return {
        "texts": data,
        **{k: (cfgs[k].describe(n_texts) if cfgs[k] is not None else None) for k in used},
    }


def legacy_params(p: dict[str, Any]) -> dict[str, Any]:
    """Parameters of an insertion run recorded before strategies (mode / bridge / recovery, steps and
    Adam lr) in today's terms, so such a run can still be rebuilt or re-run."""
    if "mode" not in p:
        return p
    out = {
        k: v
        for k, v in p.items()
        if k not in ("mode", "bridge", "bridge_steps", "recovery_steps", "recovery")
    }
    if p.get("mode") == "bridged":
        out["strategy"] = {
            "closed-form": "bridged-closed-form",
            "closed-form+trained": "bridged-closed-form+trained",
        }.get(p.get("bridge"), "bridged")
    else:
        out["strategy"] = "direct+recovery" if int(p.get("recovery_steps") or 0) > 0 else "direct"
    return out


def strategy_configs(params: Any) -> dict[str, Any]:
    """The training configurations of an insertion tool's parameters (OptimParams + epochs)."""
    return {
        "recovery": from_params(params, params.recovery_epochs) if params.recovery_epochs > 0 else None,
        "bridges": from_params(params, params.bridge_epochs) if params.bridge_epochs > 0 else None,
        "joint": from_params(params, params.joint_epochs) if params.joint_epochs > 0 else None,
    }


def train_texts_of(ctx: Any, path: str) -> tuple[list[str], dict[str, Any]]:
    """The texts training learns from: ``path`` when given, else the workload's."""
    if path.strip():
        return training_texts(path)
    wl = ctx.workload
    return list(wl.texts), {"name": wl.name, "sha256": wl.sha256, "n_texts": len(wl.texts)}


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
        heldout_concept=True,  # organs and recovery train on text that may hold the facts
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
        target,
        sets,
        score,
        max_new_tokens,
        progress,
        target.state_hash(),
        exact=exact or score == "exact",
        heldout_concept=True,
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
