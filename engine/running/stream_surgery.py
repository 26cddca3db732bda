"""Transplants on a streamed pair (docs/methods.md, "Streaming"): the weights are edited on disk, and
T, T' and D are evaluated by whole passes that read one block at a time.

* T' is written with :class:`engine.surgery.folder_edit.FolderEdit`: the target's files hard-linked,
  each changed tensor written into a copy of its shard. Only the tensors the operation changes are
  read (from the donor, or from the target for an update added to it).
* T' is then opened from that folder as a streamed model, and evaluated like T and D
  (:func:`evaluate_streamed`, through :func:`engine.loading.stream_forward.streamed_forward`).
* The target's own files are never written: the bytes of every tensor T' changes are hashed in the
  target's shards before and after, and must be equal (the streamed route's "rollback").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from ..core.errors import GraftError
from ..core.progress import Progress
from ..evaluation.evalcache import alignment_score, evaluate_model
from ..loading.models import LoadedModel, ModelSpec, load_streamed
from ..loading.stream_forward import stream_fingerprint, streamed_forward
from ..surgery.folder_edit import FolderEdit, changed_hash_of, read_tensor


def need_save(save: str, code: str) -> None:
    if not str(save).strip():
        raise GraftError(
            f"{code} on a streamed pair writes T' as a folder and evaluates it from there: give a folder to "
            "save it in (--save), or run with --stream off on a machine that holds both models"
        )


def target_key(model: LoadedModel, param: str) -> str:
    key = model.stream.keys.get(param)
    if key is None:
        raise GraftError(f"internal: {model.label} has no streamed tensor for {param}")
    return key


def original_bytes_hash(model: LoadedModel, keys: Iterable[str]) -> str:
    """A digest of the stored bytes of ``keys`` in ``model``'s own shards."""
    return changed_hash_of(model.stream.index.folder, sorted(set(keys)))


def stage_folder(
    target: LoadedModel,
    out: str,
    values: list[tuple[str, Callable[[], torch.Tensor]]],
    card: dict[str, Any],
    progress: Progress,
) -> tuple[FolderEdit, Path, bool]:
    """Write T' (``values``: target parameter name, and a function giving its new value) into a
    staged folder for ``out``. Returns the edit (``commit()`` moves it into place, ``abort()``
    removes it), the staged folder, and whether the target's own bytes are unchanged."""
    keys = [target_key(target, n) for n, _ in values]
    before = original_bytes_hash(target, keys)
    edit = FolderEdit(target.stream.index.folder, Path(out))
    try:
        for i, (name, make) in enumerate(values):
            progress(i / max(len(values), 1), f"writing {name} ({i + 1}/{len(values)})")
            value = make()
            edit.write(keys[i], value)
            del value
        staged = edit.finish(card)
    except BaseException:
        edit.abort()
        raise
    return edit, staged, original_bytes_hash(target, keys) == before


def swap_values(swap: Any, donor: LoadedModel) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """T' of a module swap as (target parameter, its new value): each the donor's tensor, read from
    its shard when it is written."""
    return [
        (t_name, lambda k=donor.stream.keys[d_name]: read_tensor(donor.stream.index, k))
        for t_name, d_name in swap.tensor_names()
    ]


def conjugated_values(target: LoadedModel, conj: Any) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """T' of a conjugation as (target parameter, its new value): each touched weight read from the
    target's shard, the update added in float64 and rounded once to the stored dtype."""
    st = target.stream
    values = []
    for n in conj.modules:
        lin = conj.linear[n]

        def new_weight(
            n: str = n, key: str = st.keys[f"{lin.path}.weight"], conv1d: bool = lin.conv1d
        ) -> Any:
            w = read_tensor(st.index, key).to(st.dtype)
            dW = conj.delta(n)
            new = (w.double() + (dW.T if conv1d else dW)).to(st.dtype)
            if not torch.isfinite(new).all():
                raise GraftError(f"the conjugated update makes {n} non-finite")
            return new

        values.append((f"{lin.path}.weight", new_weight))
    return values


def restage(
    target: LoadedModel, out: Path, values: list[tuple[str, Callable[[], torch.Tensor]]], progress: Progress
) -> tuple[str, bool]:
    """Write T' again from ``values`` into a staged folder for ``out`` and remove it: (the changed
    tensors' digest, whether the target's own bytes stayed unchanged). The stability check
    "applied twice" of a transplant on a streamed pair."""
    edit, _, untouched = stage_folder(target, str(out), values, {"operation": "stability check"}, progress)
    try:
        return edit.changed_hash(), bool(untouched)
    finally:
        edit.abort()


def update_card(folder: Path, extra: dict[str, Any]) -> None:
    """Add the measured results to the saved ``surgery.json`` (its own file: never a link)."""
    import json
    import os

    from ..loading.model_folders import SURGERY_CARD

    path = Path(folder) / SURGERY_CARD
    payload = json.loads(path.read_text())
    payload.update(extra)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False))
    os.replace(tmp, path)


def open_saved(folder: Path, like: LoadedModel) -> LoadedModel:
    """T' from its folder, streamed in ``like``'s device and dtype."""
    spec = ModelSpec.parse(str(folder))
    return load_streamed(spec, Path(folder), like.stream.device, like.stream.dtype)


def distinct(model: LoadedModel, *others: LoadedModel) -> LoadedModel:
    """``model``, or a skeleton of its own over the same folder when it is one of ``others`` (the
    same cached object twice, as for a model against itself): two passes at once need two skeletons."""
    if any(model is o for o in others):
        return load_streamed(model.spec, model.stream.index.folder, model.stream.device, model.stream.dtype)
    return model


def evaluate_streamed(
    model: LoadedModel,
    sets: tuple[Any, Any],
    score: str,
    max_new_tokens: int,
    progress: Progress,
    heldout_concept: bool = False,
) -> dict[str, Any]:
    """:func:`engine.evaluation.evalcache.evaluate_model` of a streamed model. Greedy generations (the
    exact score) read the whole model once per new token, so they run only when ``score`` is exact."""
    with streamed_forward(model, progress) as net:
        return evaluate_model(
            net,
            model.tokenizer,
            sets[0],
            sets[1],
            score=score,
            exact=score == "exact",
            max_new_tokens=max_new_tokens,
            state_hash=stream_fingerprint(model),
            progress=progress,
            heldout_concept=heldout_concept,
        )


def alignment_streamed(donor: LoadedModel, model: LoadedModel, prompts: list[str]) -> Optional[float]:
    """The alignment score (greedy next-token agreement with D) of two streamed models."""
    donor = distinct(donor, model)
    with streamed_forward(donor) as d, streamed_forward(model) as m:
        return alignment_score(
            d,
            donor.tokenizer,
            m,
            model.tokenizer,
            prompts,
            donor_hash=stream_fingerprint(donor),
            state_hash=stream_fingerprint(model),
        )["score"]
