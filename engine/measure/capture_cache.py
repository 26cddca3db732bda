"""The capture cache shared by T2-T4 (and the conjugation's plan): one capture per model object,
texts, modules and residual choice, kept in a small LRU, so tools run one after the other on the same
pair pay for one forward pass each."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Optional, Sequence

from ..core.data import texts_sha256
from ..core.progress import Progress
from ..loading.models import LoadedModel
from .budget import budget_texts
from .capture import Capture, capture
from .stream_capture import capture_streamed


class CaptureCache:
    """Small LRU of captures keyed by (model object, texts, modules, module inputs, residual), shared by
    T2-T4.

    The key holds a weak reference to the model object so a freed model never matches a new one
    that reuses its id.
    """

    def __init__(self, max_items: int = 6) -> None:
        self.max_items = max_items
        self._items: "OrderedDict[tuple, tuple[weakref.ref, Capture]]" = OrderedDict()
        self._budgets: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(
        model: LoadedModel,
        texts: Sequence[str],
        modules: Sequence[str],
        batch_size: int,
        module_inputs: Sequence[str] = (),
        residual: bool = True,
    ) -> tuple:
        h = texts_sha256(texts)
        return (
            id(model.model),
            h,
            tuple(sorted(set(modules))),
            tuple(sorted(set(module_inputs))),
            bool(residual),
        )

    def budget(
        self, texts: Sequence[str], tokenizers: Sequence, max_tokens: int, per_text: int
    ) -> tuple[list[str], list]:
        """:func:`budget_texts` memoised (the texts kept and the cut log): every tool of a job, and
        every call inside one tool, budgets the same workload for the same tokenizers, and
        tokenizing it again costs as much as the tiny models' forward passes."""
        key = (
            "budget",
            texts_sha256(texts),
            tuple(id(t) for t in tokenizers),
            int(max_tokens),
            int(per_text),
        )
        with self._lock:
            hit = self._budgets.get(key)
            if hit is not None and all(r() is t for r, t in zip(hit[0], tokenizers)):
                self._budgets.move_to_end(key)
                return list(hit[1]), list(hit[2])
        cut: list = []
        kept = budget_texts(texts, tokenizers, max_tokens, per_text=per_text, cut_log=cut)
        with self._lock:
            self._budgets[key] = (tuple(weakref.ref(t) for t in tokenizers), kept, cut)
            while len(self._budgets) > self.max_items:
                self._budgets.popitem(last=False)
        return list(kept), list(cut)

    def get(
        self,
        model: LoadedModel,
        texts: Sequence[str],
        *,
        modules: Sequence[str] = (),
        batch_size: int = 8,
        progress: Optional[Progress] = None,
        module_inputs: Sequence[str] = (),
        residual: bool = True,
    ) -> Capture:
        key = self._key(model, texts, modules, batch_size, module_inputs, residual)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and hit[0]() is model.model:
                self._items.move_to_end(key)
                return hit[1]
        cap = capture_model(
            model,
            texts,
            modules=modules,
            module_inputs=module_inputs,
            residual=residual,
            batch_size=batch_size,
            progress=progress,
        )
        with self._lock:
            self._items[key] = (weakref.ref(model.model), cap)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
            on_gpu = [k for k, (_, c) in self._items.items() if c.residual_device is not None]
            for k in on_gpu[:-2]:  # GPU memory holds the residual streams of one pair at most
                del self._items[k]
        return cap


DEFAULT_CACHE = CaptureCache()


def capture_model(model: LoadedModel, texts: Sequence[str], **kw: Any) -> Capture:
    """:func:`engine.measure.capture.capture` for a model held whole, and
    :func:`engine.measure.stream_capture.capture_streamed` (the same rows, block by block) for a
    model that streams."""
    if getattr(model, "streamed", False):
        return capture_streamed(model, texts, **kw)
    return capture(model, texts, **kw)
