"""T12 ``interference``: what a transplant broke, and whether it is stable (docs/methods.md T12).

T' is a finished transplant run rebuilt from the history (``--run``, :mod:`engine.running.rebuild`: module
swap, rank-k conjugation, or any operation with a registered rebuilder), or a module swap made on
the spot (``--donor``/``--target``, the same module choice as T11). On the retained set (and on a
text file the user brings) it measures, with :func:`engine.evaluation.interference.interference`:

* the per-example loss change ``T' - T`` (mean token NLL of each text), its histogram and the
  worst-hit examples with their text, losses and greedy continuations;
* locality: the share of retained prompts whose greedy continuation is unchanged, and the changed
  ones with the changed words marked (:func:`engine.evaluation.evaluate.word_diff`, T -> T').

Stability, as checks that can fail: the same transplant applied twice gives identical weight
hashes (and the run's recorded one), and T' saved as a Hugging Face folder and reloaded gives an
identical loss on every retained text. T' is rolled back before the tool returns.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..core.data import builtin_retained_path, load_concept_set, load_workload
from ..core.params import GreedyTokensParam, RetainedSetParam, param
from ..core.progress import Progress
from ..evaluation.beforeafter import locked, rnd
from ..evaluation.evaluate import word_diff
from ..evaluation.interference import interference
from ..running.context import ToolContext
from ..running.rebuild import TransplantChoice, reapply_check, reload_check, save_for_check, transplant_for
from ..running.registry import Tool, register


@dataclass(frozen=True)
class InterferenceParams(TransplantChoice, RetainedSetParam, GreedyTokensParam):
    texts: str = param(
        "",
        'Your own text file to check as well: plain text (one text per line), {"text"} JSONL '
        "or a concept set. Empty = none.",
        path="in",
    )
    prompt_tokens: int = param(
        16, "Each text's prompt for locality: its first this many tokens.", min=1, max=4096
    )
    n_worst: int = param(5, "How many of the worst-hit examples to list.", min=1, max=1000)
    bins: int = param(20, "Histogram bins of the per-example loss change.", min=2, max=200)
    stability: bool = param(
        True,
        "Run the stability checks: apply twice (weight hashes) and save + reload "
        "(identical losses). The reload writes T' to a temporary folder.",
    )


@dataclass
class InterferenceResult:
    source: dict[str, Any]  # what T' is: run id or on-the-spot swap, operation, modules, weight hashes
    retained: dict[
        str, Any
    ]  # per set: perplexities, loss changes, histogram, worst hit, locality, changed prompts
    extra: Optional[dict[str, Any]]  # the same on the user's text file, or None
    locality: Optional[float]  # retained set: share of prompts whose greedy continuation is unchanged
    ppl_change_fraction: Optional[float]  # retained perplexity T'/T - 1
    mean_loss_change: Optional[float]  # retained set: mean over examples of loss(T') - loss(T), nats
    max_loss_increase: Optional[float]
    worst_index: Optional[int]  # retained example with the largest loss increase
    stability: dict[
        str, Any
    ]  # {"reapply": {passed, detail, ...}, "reload": {passed, detail, ...}}; {} when off
    stability_passed: Optional[bool]  # both checks passed (None when not run)
    settings: dict[str, Any]


def histogram(values: list[float], bins: int) -> dict[str, Any]:
    """Counts of ``values`` in ``bins`` equal bins over their range (numpy.histogram: a range of
    one value becomes [v - 0.5, v + 0.5])."""
    if not values:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins)
    return {"edges": [rnd(e, 8) for e in edges.tolist()], "counts": [int(c) for c in counts]}


def summarise(rep: dict[str, Any], name: str, sha256: str, n_worst: int, bins: int) -> dict[str, Any]:
    """One set's interference report in the result's shape (JSON numbers rounded)."""
    rows = rep["per_example"]
    changes = sorted(
        ((r["loss_change"], i) for i, r in enumerate(rows) if r["loss_change"] is not None),
        key=lambda c: (-c[0], c[1]),
    )

    def row(i: int) -> dict[str, Any]:
        r = rows[i]
        return {
            "index": i,
            "text": r["text"],
            "loss_before": rnd(r["loss_before"]),
            "loss_after": rnd(r["loss_after"]),
            "loss_change": rnd(r["loss_change"]),
            "changed": r["changed"],
            "prompt": r["prompt"],
            "before": r["before"],
            "after": r["after"],
        }

    return {
        "name": name,
        "sha256": sha256,
        "n_examples": len(rows),
        "n_tokens": rep["n_tokens"],
        "ppl_before": rnd(rep["ppl_before"]),
        "ppl_after": rnd(rep["ppl_after"]),
        "ppl_change_fraction": rnd(rep["ppl_change_fraction"]),
        "mean_loss_change": rnd(rep["mean_loss_change"]),
        "max_loss_increase": rnd(rep["max_loss_increase"]),
        "locality": rnd(rep["locality"]),
        "n_prompts": rep["n_prompts"],
        "n_changed": rep["n_changed"],
        "histogram": histogram([c for c, _ in changes], bins),
        "worst": [row(i) for _, i in changes[:n_worst]],
        "changed": [
            {
                **{k: v for k, v in row(i).items() if k not in ("text", "changed")},
                "diff": word_diff(rows[i]["before"], rows[i]["after"]),
            }
            for i in range(len(rows))
            if rows[i]["changed"]
        ],
        "per_example": [
            {
                "index": i,
                "loss_before": rnd(r["loss_before"]),
                "loss_after": rnd(r["loss_after"]),
                "loss_change": rnd(r["loss_change"]),
                "changed": r["changed"],
            }
            for i, r in enumerate(rows)
        ],
    }


def compute_interference(
    ctx: ToolContext, params: InterferenceParams, progress: Progress
) -> InterferenceResult:
    retained = load_concept_set(params.retained or builtin_retained_path())
    extra_set = load_workload(params.texts) if params.texts else None
    rb = transplant_for(ctx, params.k, params.modules, progress.sub(0.0, 0.15))
    opts = dict(
        max_new_tokens=params.max_new_tokens,
        prompt_tokens=params.prompt_tokens,
        batch_size=ctx.options.batch_size,
    )
    try:
        tok = rb.target.tokenizer
        with locked(rb.target):  # the cached target is evaluated: no capture may hook it meanwhile
            rep = interference(
                rb.target.model, rb.working, tok, retained.texts(), progress=progress.sub(0.15, 0.55), **opts
            )
            rep_x = (
                interference(
                    rb.target.model,
                    rb.working,
                    tok,
                    extra_set.texts,
                    progress=progress.sub(0.55, 0.7),
                    **opts,
                )
                if extra_set is not None
                else None
            )
        stability: dict[str, Any] = {}
        if params.stability:
            progress(0.7, "stability: applying the transplant twice")
            stability["reapply"] = reapply_check(rb.edit, (rb.source or {}).get("weight_hash_after"))
            progress(0.8, "stability: saving T' and reloading it")
            with tempfile.TemporaryDirectory(prefix="graft-t12-") as tmp:
                folder = save_for_check(rb.working, tok, Path(tmp) / "t-prime", rb.source or {}, rb.edit)
                progress(0.9, "stability: scoring the reloaded T'")
                stability["reload"] = reload_check(
                    folder,
                    [r["text"] for r in rep["per_example"]],
                    rep["ppl_after"],
                    [r["loss_after"] for r in rep["per_example"]],
                    rb.target.device,
                    str(rb.target.dtype).replace("torch.", ""),
                    batch_size=ctx.options.batch_size,
                )
            for check in stability.values():
                check.update({k: rnd(v, 10) for k, v in check.items() if isinstance(v, float)})
    finally:
        rb.undo()
    ret = summarise(rep, retained.name, retained.sha256, params.n_worst, params.bins)
    progress(1.0, "interference measured")
    return InterferenceResult(
        source=rb.source or {},
        retained=ret,
        extra=summarise(rep_x, extra_set.name, extra_set.sha256, params.n_worst, params.bins)
        if rep_x
        else None,
        locality=ret["locality"],
        ppl_change_fraction=ret["ppl_change_fraction"],
        mean_loss_change=ret["mean_loss_change"],
        max_loss_increase=ret["max_loss_increase"],
        worst_index=ret["worst"][0]["index"] if ret["worst"] else None,
        stability=stability,
        stability_passed=all(c["passed"] for c in stability.values()) if stability else None,
        settings={
            "max_new_tokens": rep["max_new_tokens"],
            "prompt_tokens": params.prompt_tokens,
            "n_worst": params.n_worst,
            "bins": params.bins,
        },
    )


TOOL = register(
    Tool(
        name="interference",
        code="T12",
        title="Interference and stability",
        summary="What a transplant broke: per-example loss change T' − T on the retained set (and your own "
        "texts), the "
        "worst-hit examples, locality (prompts whose greedy continuation is unchanged, changed words "
        "marked), "
        "and two stability checks that can fail: the transplant applied twice hashes identically, and T' "
        "saved and reloaded scores identically. Takes a finished transplant run, or swaps modules itself.",
        params_cls=InterferenceParams,
        compute=compute_interference,
        figure="viz.verdict:interference_figure",
        page="Verdict",
        same_family=True,
        needs=(("run",), ("donor", "target")),
        run_label="Run T12",
    )
)
