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

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..core.data import builtin_retained_path, load_concept_set, load_workload
from ..core.params import GreedyTokensParam, RetainedSetParam, param
from ..core.progress import Progress
from ..evaluation.beforeafter import locked, rnd
from ..evaluation.evaluate import perplexity, word_diff
from ..evaluation.interference import interference
from ..loading.model_folders import SURGERY_CARD
from ..loading.stream_forward import streamed_forward
from ..running.context import ToolContext
from ..running.rebuild import (
    TransplantChoice,
    load_run,
    reapply_check,
    reload_check,
    reload_verdict,
    save_for_check,
    transplant_for,
)
from ..running.registry import Tool, register
from ..running.stream_rebuild import streamed_tprime
from ..running.stream_surgery import open_saved


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


STREAM_BATCH = 16  # texts per pass on the streamed route, as the memory plan counts (each pass reads T whole)


def compute_interference(
    ctx: ToolContext, params: InterferenceParams, progress: Progress
) -> InterferenceResult:
    retained = load_concept_set(params.retained or builtin_retained_path())
    extra_set = load_workload(params.texts) if params.texts else None
    if streamed_route(ctx):
        return _streamed(ctx, params, progress, retained, extra_set)
    rb = transplant_for(ctx, params.k, params.modules, progress.sub(0.0, 0.15))
    opts = dict(
        max_new_tokens=params.max_new_tokens,
        prompt_tokens=params.prompt_tokens,
        batch_size=ctx.options.batch_size,
    )
    try:
        tok = rb.target.tokenizer
        with locked(rb.target):  # the cached target is evaluated: no capture may hook it meanwhile
            rep, rep_x = _measure(rb.target.model, rb.working, tok, retained, extra_set, opts, progress)
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
    finally:
        rb.undo()
    return _result(rep, rep_x, retained, extra_set, stability, rb.source or {}, params, progress)


def streamed_route(ctx: ToolContext) -> bool:
    """T12 on the streamed route: a run made on a streamed pair, or a streamed donor and target."""
    if ctx.run is not None:
        return (load_run(ctx.run).get("result") or {}).get("route") == "streamed"
    return bool(ctx.target is not None and ctx.target.streamed)


def _measure(
    before: Any, after: Any, tok: Any, retained: Any, extra_set: Any, opts: dict, progress: Progress
):
    rep = interference(before, after, tok, retained.texts(), progress=progress.sub(0.15, 0.55), **opts)
    rep_x = (
        interference(before, after, tok, extra_set.texts, progress=progress.sub(0.55, 0.7), **opts)
        if extra_set is not None
        else None
    )
    return rep, rep_x


def _streamed(
    ctx: ToolContext, params: InterferenceParams, progress: Progress, retained: Any, extra_set: Any
) -> InterferenceResult:
    """T12 with T and T' read block by block (engine/running/stream_rebuild.py): T' is a run's saved
    folder or a swap staged beside the target, and each pass of 16 texts reads a model once."""
    tp = streamed_tprime(ctx, params.k, params.modules, progress.sub(0.0, 0.15))
    opts = dict(
        max_new_tokens=params.max_new_tokens, prompt_tokens=params.prompt_tokens, batch_size=STREAM_BATCH
    )
    try:
        tok = tp.target.tokenizer
        with streamed_forward(tp.target, progress) as t, streamed_forward(tp.tprime, progress) as t_prime:
            rep, rep_x = _measure(t, t_prime, tok, retained, extra_set, opts, progress)
        stability: dict[str, Any] = {}
        if params.stability:
            progress(0.7, "stability: writing T' a second time")
            stability["reapply"] = tp.again(progress.sub(0.7, 0.85))
            progress(0.85, "stability: scoring T' read afresh from its folder")
            texts = [r["text"] for r in rep["per_example"]]
            fresh = open_saved(tp.folder, tp.target)
            with streamed_forward(fresh, progress) as net:
                again = perplexity(net, tok, texts, batch_size=STREAM_BATCH, max_length=256)
            card = json.loads((tp.folder / SURGERY_CARD).read_text())
            stability["reload"] = reload_verdict(
                again,
                rep["ppl_after"],
                [r["loss_after"] for r in rep["per_example"]],
                # T''s changed tensors were read back from disk when it was written or opened
                tp.changed_sha256 == card.get("changed_tensors_sha256"),
            )
    finally:
        tp.close()
    return _result(rep, rep_x, retained, extra_set, stability, tp.source, params, progress)


def _result(
    rep: dict,
    rep_x: Optional[dict],
    retained: Any,
    extra_set: Any,
    stability: dict[str, Any],
    source: dict[str, Any],
    params: InterferenceParams,
    progress: Progress,
) -> InterferenceResult:
    for check in stability.values():
        check.update({k: rnd(v, 10) for k, v in check.items() if isinstance(v, float)})
    ret = summarise(rep, retained.name, retained.sha256, params.n_worst, params.bins)
    progress(1.0, "interference measured")
    return InterferenceResult(
        source=source,
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
        streams=True,  # T and T' read block by block; T' a run's saved folder or a swap staged beside T
        edits=True,
    )
)
