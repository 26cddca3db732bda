"""Whole forward passes of a streamed model (docs/methods.md, "Streaming").

Inside :func:`streamed_forward` the meta-device skeleton of a streamed
:class:`~engine.loading.models.LoadedModel` behaves as a model held whole, for the evaluations that
call ``model(input_ids=..., attention_mask=...)`` (perplexity, graded score, greedy next tokens,
generation): the parts outside the blocks and the LM head are read once, and each block reads its
weights when it is entered and drops them when it returns. One call reads the whole model once, and
holds one block at a time. Cheap for captures (one pass serves every batch,
:mod:`engine.measure.stream_capture`), this route costs one read per call: it is for the few
teacher-forced passes a transplant's evaluation makes.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from ..core.errors import GraftError
from ..core.progress import Progress


class _Reading:
    """Stands in for block ``l``'s forward: read its weights, run it, drop them; then say how far the
    pass is, in blocks and bytes (``report``)."""

    def __init__(self, st: Any, l: int, forward: Any, report: Optional[Callable[[int], None]] = None) -> None:
        self.st, self.l, self.forward, self.report = st, l, forward, report

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.st.block(self.l):
            out = self.forward(*args, **kwargs)
        if self.report is not None:
            self.report(self.l)
        return out


def head_keys(model: Any) -> dict[str, str]:
    """Checkpoint keys of the LM head's parameters that the backbone does not read (an untied head)."""
    st = model.stream
    prefix = getattr(model.model, "base_model_prefix", "") or ""
    out: dict[str, str] = {}
    for n, p in model.model.named_parameters(remove_duplicate=False):
        if n in st.keys or p.device.type != "meta":
            continue
        if any(m is not None and getattr(m, a, None) is p for m, a, _ in st.tied):
            continue
        k = st.index.key_for(n, prefix)
        if k is None:
            raise GraftError(f"cannot stream {model.label}: its weights have no tensor for {n}")
        out[n] = k
    return out


@contextmanager
def streamed_forward(model: Any, progress: Optional[Progress] = None) -> Iterator[Any]:
    """``model.model`` runs whole passes while inside; yields it. Holds the model's lock.
    ``progress``: each block read is noted (block, and GB read so far) and is a cancellation point."""
    st = model.stream
    if st is None:
        raise GraftError(f"internal: {model.label} does not stream")
    blocks = model.arch.blocks
    report = None
    if progress is not None:
        n = len(blocks)

        def report(l: int) -> None:
            progress.note(f"{model.label}: block {l + 1}/{n} read, {st.bytes_read / 1e9:.2f} GB read in all")

    with model.lock:
        extra = head_keys(model)
        st.keys.update(extra)
        own = [b.__dict__.get("forward") for b in blocks]
        try:
            with st.outside():
                for l, b in enumerate(blocks):
                    b.forward = _Reading(st, l, b.forward, report)
                yield model.model
        finally:
            for b, f in zip(blocks, own):
                b.__dict__.pop("forward", None)
                if f is not None:
                    b.forward = f
            for n in extra:
                st.keys.pop(n, None)


def stream_fingerprint(model: Any) -> str:
    """Identity of a streamed model's weights for the evaluation cache: its folder, and each shard's
    name, size and modification time (the weights are not in memory to hash)."""
    st = model.stream
    h = hashlib.sha256(str(st.index.folder.resolve()).encode())
    for f in sorted({e.file for e in st.index.entries.values()}):
        s = (st.index.folder / f).stat()
        h.update(f"{f}:{s.st_size}:{s.st_mtime_ns}:{s.st_ino}".encode())
    h.update(str(st.dtype).encode())
    return "files:" + h.hexdigest()


@contextmanager
def held(*pairs: tuple[Any, list[str]]) -> Iterator[None]:
    """Parameters ``names`` of each streamed model read in while inside (a model held whole: nothing
    to do). For weight tools that need a few tensors of a streamed model, not a pass through it."""
    from contextlib import ExitStack

    todo: dict[int, tuple[Any, list[str]]] = {}
    for model, names in pairs:
        if getattr(model, "stream", None) is None:
            continue
        entry = todo.setdefault(id(model), (model, []))
        entry[1].extend(n for n in names if n not in entry[1])
    with ExitStack() as stack:
        for model, names in todo.values():
            stack.enter_context(model.lock)
            missing = [n for n in names if n not in model.stream.keys]
            if missing:
                raise GraftError(f"internal: {model.label} streams no tensor {missing[0]}")
            model.stream.read(names)
            stack.callback(model.stream.drop, names)
        yield
