"""T9 on a streamed target (docs/methods.md, "Streaming"): an organ inserted without the target in memory.

The direct insertion at position ``p`` replaces the target's blocks ``p .. p+k-1`` by the organ's
blocks. On the streamed route that is an edit of the target's folder: the organ's tensors are written
over those blocks' tensors in a staged copy of the folder (:class:`engine.surgery.folder_edit.FolderEdit`:
the untouched shards hard-linked, the touched ones copied), T' is evaluated from there block by
block, and the staged folder is removed before the next position. The target's files are never
written, and each position holds one block of the target plus the organ in memory.

Only the training-free direct strategy runs here: bridges are modules that the target's folder has
no place for, and the training strategies back-propagate through the whole target.

Two differences from the in-memory route, both said in the result's notes:

* the organ's tensors are stored in the target's stored dtype (in memory they are cast to the run's
  dtype), so a float32 organ in a bfloat16 target is rounded once;
* each replaced block keeps the target's module at that index, with its per-layer settings; in
  memory the organ's blocks are copies of the target's block ``p`` re-indexed.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..core.errors import GraftError
from ..core.progress import Progress
from ..loading.models import LoadedModel, ModelSpec
from ..surgery.organ import Organ
from .stream_rebuild import scratch_folder
from .stream_surgery import evaluate_streamed, open_saved, stage_folder

STRATEGIES = ("direct",)
STREAM_NOTE = (
    "streamed target: the organ's tensors are written in the target's stored dtype over blocks p..p+k-1 "
    "of a staged copy of its folder, and each replaced block keeps the target's per-layer settings"
)


def check_strategy(strategy: str, code: str = "T9") -> None:
    if strategy not in STRATEGIES:
        raise GraftError(
            f"{code} on a streamed target runs the direct strategy only ({strategy} trains or adds bridges, "
            "which needs the target in memory): use --strategy direct, or --stream off"
        )


def organ_values(target: LoadedModel, organ: Organ, position: int) -> list[tuple[str, Callable[[], Any]]]:
    """The insertion at ``position`` as (target parameter, new value): block ``position + i`` takes the
    organ's block ``i``, tensor for tensor. Refuses an organ whose blocks hold other tensors."""
    keys = target.stream.keys
    prefix = target.arch.blocks_path
    values = []
    for i in range(organ.size):
        state = organ.block_state(i)
        here = f"{prefix}.{position + i}."
        own = {n[len(here) :] for n in keys if n.startswith(here)}
        if set(state) != own:
            extra = sorted(set(state) - own) or sorted(own - set(state))
            raise GraftError(
                f"the organ's block {i} does not fit {target.label}'s block {position + i}: "
                f"{extra[0]} is in one and not the other"
            )
        for rel in sorted(state):
            values.append((here + rel, lambda t=state[rel]: t))
    return values


def insert_and_evaluate(
    target: LoadedModel, organ: Organ, position: int, sets: Any, progress: Progress
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The organ inserted directly at ``position`` of the streamed ``target``, evaluated as T9
    evaluates an insertion (graded score, concept perplexity on held-out text); the staged T' is
    removed before returning. Returns (the evaluation, the folder edit's summary)."""
    card = {"operation": "organ insertion (T9, removed after)", "organ": organ.name, "position": position}
    edit, staged, untouched = stage_folder(
        target,
        str(scratch_folder(target, f"t9-p{position}")),
        organ_values(target, organ, position),
        card,
        progress.sub(0.0, 0.2),
    )
    try:
        if not untouched:  # pragma: no cover - guard: stage_folder never writes the target's files
            raise GraftError("internal: inserting the organ changed the target's own bytes")
        tp = open_saved(staged, target)
        ev = evaluate_streamed(tp, sets, "graded", 16, progress.sub(0.2, 1.0), heldout_concept=True)
        return ev, edit.summary()
    finally:
        edit.abort()


def streamed_source(ctx: Any, organ: Organ, progress: Progress) -> tuple[Optional[LoadedModel], str]:
    """The organ's source for T4's epsilon, streamed when it is a folder (a built-in model is small
    and held whole), and a note: a streamed source's weights are not in memory to hash."""
    try:
        spec = ModelSpec.parse(organ.source_ref)
        try:
            src = ctx.store.get(spec, ctx.options.device, ctx.options.dtype, progress, stream=True)
        except GraftError:
            src = ctx.store.get(spec, ctx.options.device, ctx.options.dtype, progress)
    except GraftError as e:
        return None, f"the organ's source {organ.source_ref} cannot be loaded ({e})"
    if src.streamed:
        return src, f"the organ's source {src.label} streams: it was not checked against the organ's hash"
    recorded = organ.card["source"].get("weight_hash")
    if recorded is not None and src.state_hash() != recorded:
        return src, f"the organ's source {src.label} no longer hashes as when the organ was extracted"
    return src, ""
