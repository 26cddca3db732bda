"""The conjugation (OP3) on a streamed pair: the plan is fitted on streamed captures as on the other
route; T' = T + B_T A_T is staged as a folder (each touched weight read from the target's shard,
the update added in float64 and rounded once, written into a copy of that shard); D is the base with
the update added as each block is read (or the streamed fine-tuned donor); T, D and T' are evaluated
block by block. T' moves into place only when it is not rolled back. Not a tool of its own: the
``conjugate`` tool calls it when the target streams."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from ..core.progress import Progress
from ..evaluation.interference import should_roll_back
from ..loading.models import LoadedModel, load_streamed
from ..loading.stream_forward import stream_fingerprint, streamed_forward
from ..running.context import ToolContext
from ..running.stream_surgery import conjugated_values, distinct, open_saved, stage_folder, update_card


def _base_plus_update(base: LoadedModel, deltas: list) -> LoadedModel:
    """D = the base with the adapter's update, streamed: a skeleton of its own whose reads add dW."""
    d = load_streamed(base.spec, base.stream.index.folder, base.stream.device, base.stream.dtype)
    mods = {m.name: m for m in d.arch.linear_modules()}
    for delta in deltas:
        lm = mods.get(delta.name)
        if lm is None:
            continue

        def add(delta: Any = delta, conv1d: bool = lm.conv1d) -> torch.Tensor:
            upd = delta.B.double() @ delta.A.double()
            return upd.T if conv1d else upd

        d.stream.adds[f"{lm.path}.weight"] = add
    return d


def conjugate_streamed(
    ctx: ToolContext,
    params: Any,
    progress: Progress,
    sets: Any,
    deltas: list,
    conj: Any,
    rep: dict,
    source: dict,
    warnings: list[str],
) -> Any:
    from .conjugate import card_extra, make_result, measure_conjugation

    base, target = ctx.base, ctx.target
    values = conjugated_values(target, conj)
    card = {**conj_card(conj, rep), "route": "streamed"}
    progress(0.5, f"writing T' ({len(values)} weights) into a staged folder")
    edit, staged, untouched = stage_folder(target, params.save, values, card, progress.sub(0.5, 0.6))
    try:
        saved = open_saved(staged, target)
        donor = distinct(ctx.donor, target) if ctx.donor is not None else _base_plus_update(base, deltas)
        hashes = {
            "t": stream_fingerprint(target),
            "d": stream_fingerprint(donor),
            "tp": stream_fingerprint(saved),
        }
        if ctx.donor is None:
            upd = json.dumps(source, sort_keys=True, default=str).encode()
            hashes["d"] += ":plus-update:" + hashlib.sha256(upd).hexdigest()
        with (
            streamed_forward(target, progress) as t,
            streamed_forward(donor, progress) as d,
            streamed_forward(saved, progress) as tp,
        ):
            m = measure_conjugation(
                ctx,
                params,
                sets,
                {"t": (t, target.tokenizer), "d": (d, donor.tokenizer), "tp": (tp, target.tokenizer)},
                hashes,
                progress.sub(0.6, 0.95),
                exact=params.score == "exact",
                streamed=True,
            )
        roll, why = should_roll_back(
            m["inter"],
            params.max_retained_increase if params.max_retained_increase >= 0 else None,
            min_locality=params.min_locality or None,
        )
        extra = card_extra(ctx, params, source, m, hashes["t"], hashes["tp"])
        full = {**conj_card(conj, rep), **extra, "route": "streamed"}
        saved_to = None
        if roll:
            progress(0.96, "rolled back: " + why + "; T' is not saved")
            edit.abort()
        else:
            update_card(staged, full)
            progress(0.97, f"moving T' into place at {params.save}")
            saved_to = str(edit.commit())
    except BaseException:
        edit.abort()
        raise
    progress(1.0, "done")
    return make_result(
        m, params, source, base, rep, roll, why, hashes["t"], hashes["tp"], bool(untouched), bool(untouched),
        saved_to, full, None, warnings, route="streamed", saved_files=edit.summary(),
    )  # fmt: skip


def conj_card(conj: Any, rep: dict) -> dict[str, Any]:
    """The parts of :meth:`engine.surgery.conjugate.Conjugation.card` that need no weights in memory."""
    from ..surgery.conjugate import OPERATION

    return {
        "operation": OPERATION,
        "base": conj.plan.base_label,
        "target": conj.target.spec.ref,
        "target_modules": list(conj.modules),
        "plan": {k: v for k, v in rep.items() if k != "seconds"},
    }
