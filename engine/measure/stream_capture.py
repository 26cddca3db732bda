"""Activation capture of a streamed model, one block at a time (sequential onloading).

The same :class:`~engine.measure.capture.Capture` as :func:`engine.measure.capture.capture`, from
the same tokens, batches and kernels, in another loop order: instead of each batch running through
every block, every batch runs through one block, then the next block is read.

1. A dry pass per batch, with the parts outside the blocks read (embeddings, position tables) and
   every block replaced by a recorder that returns its input unchanged: it keeps the input of
   block 0 (``h_{-1}``) and the arguments the model gives each block (attention mask, position
   ids, rotary tables; per layer, since some families give sliding-window layers their own).
2. For each block l: read its weights (:meth:`engine.loading.stream.StreamedWeights.block`), run
   every batch's hidden states through it with those arguments, keep the rows the diagnostics need
   (the residual stream ``h_l`` and any hooked module's rows), and drop the weights again.

Peak memory is one block's weights, plus the workload's hidden states (batches x padded length x
width, in the run's dtype), plus the captured rows. A cancel (the progress callback raises) drops
the block being read; nothing is written anywhere.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..core.errors import GraftError
from ..core.progress import Progress, silent
from ..loading.models import LoadedModel
from .budget import MAX_TOKENS_PER_TEXT, length_batches


class _Recorder:
    """Stands in for block ``l`` in the dry pass: records what the model passes it, and returns the
    hidden states unchanged (every block family here returns a tensor)."""

    def __init__(self, l: int, calls: dict[int, tuple[tuple, dict]], first: list) -> None:
        self.l, self.calls, self.first = l, calls, first

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            h, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            h, rest = kwargs.pop("hidden_states"), ()
        if self.l == 0:
            self.first.append(h)
        self.calls[self.l] = (rest, kwargs)
        return h


def _run_block(block: torch.nn.Module, h: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor:
    out = block(h, *rest, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class LayerWalker:
    """One streamed pass over a workload, a block at a time: :meth:`embeddings` gives the rows of
    ``h_{-1}``, then :meth:`step` runs block ``l`` over every batch and gives the rows of ``h_l``.

    Construction tokenises the texts and makes the dry pass (step 1 above); the caller holds the
    model's lock for the walker's life. Rows are float32 ``(n, d)`` on the CPU, in workload order
    (one row per kept token), the rows :func:`capture_streamed` stores for that layer.
    """

    def __init__(
        self,
        model: LoadedModel,
        texts: Sequence[str],
        *,
        batch_size: int = 8,
        progress: Optional[Progress] = None,
        modules: Sequence[str] = (),
        module_inputs: Sequence[str] = (),
    ) -> None:
        from ..loading.tokens import context_length, pad_id, pad_right
        from .capture import backbone, encode_texts, requested_modules, to_device

        self.model, self.progress = model, progress or silent()
        st = self.st = model.stream
        tok = model.tokenizer
        max_length = min(MAX_TOKENS_PER_TEXT, context_length(model.model))
        self.lin, self.modules, self.module_inputs = requested_modules(model, modules, module_inputs)
        self.L = model.arch.n_layers
        self.fast = bool(getattr(tok, "is_fast", False))
        enc = self.enc = encode_texts(tok, texts, max_length, self.fast)
        self.texts = list(texts)
        counts = [int(keep.sum()) for _, keep, _ in enc]
        starts = np.cumsum([0] + counts)
        self.n = int(starts[-1])
        if self.n == 0:
            raise GraftError("the workload produced no tokens")
        fill = pad_id(tok)
        net = backbone(model)
        blocks = self.blocks = model.arch.blocks
        self.total = sum(st.block_bytes(l) for l in range(self.L)) + sum(
            st.index.entries[st.keys[n]].nbytes for n in st.outside_params()
        )
        self.batches: list[dict[str, Any]] = []
        self.progress(0.0, f"{model.label}: reading embeddings")
        own = [b.__dict__.get("forward") for b in blocks]  # a forward set on the instance (rare)
        try:
            with st.outside():
                calls: dict[int, tuple[tuple, dict]] = {}
                first: list[torch.Tensor] = []
                for l, b in enumerate(blocks):
                    b.forward = _Recorder(l, calls, first)
                for idx in length_batches([len(ids) for ids, _, _ in enc], batch_size):
                    if not any(counts[i] for i in idx):
                        continue
                    ids, mask = pad_right([enc[i][0] for i in idx], fill, torch.device("cpu"))
                    T = ids.shape[1]
                    calls.clear()
                    first.clear()
                    net(
                        input_ids=to_device(ids, model.device),
                        attention_mask=to_device(mask, model.device),
                        use_cache=False,
                    )
                    if len(calls) != self.L or not first:
                        raise GraftError(
                            f"internal: the dry pass of {model.label} reached {len(calls)} of {self.L} blocks"
                        )
                    rows = torch.from_numpy(
                        np.concatenate([r * T + np.flatnonzero(enc[i][1]) for r, i in enumerate(idx)])
                    )
                    dest = torch.from_numpy(
                        np.concatenate([np.arange(starts[i], starts[i + 1]) for i in idx])
                    )
                    self.batches.append(
                        {
                            "h": first[0],
                            "calls": dict(calls),
                            "rows": to_device(rows, model.device),
                            "dest": dest,
                        }
                    )
        finally:
            for b, f in zip(blocks, own):
                b.__dict__.pop("forward", None)
                if f is not None:
                    b.forward = f
        self.layer = -1  # the layer whose rows the batches hold now
        self.per_module: dict[str, list[torch.Tensor]] = {m: [] for m in self.modules}
        self.per_input: dict[str, list[torch.Tensor]] = {m: [] for m in self.module_inputs}
        self.shares: dict[str, Optional[str]] = {}

    @staticmethod
    def _take(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return h.reshape(-1, h.shape[-1]).index_select(0, rows)

    def _rows(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        d = self.batches[0]["h"].shape[-1]
        out = torch.empty((self.n, d), dtype=torch.float32) if out is None else out
        for bt in self.batches:
            out.index_copy_(0, bt["dest"], self._take(bt["h"], bt["rows"]).float().cpu())
        return out

    def embeddings(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The rows of ``h_{-1}`` (into ``out`` when given)."""
        if self.layer != -1:
            raise GraftError("internal: the walker has left the embeddings")
        return self._rows(out)

    def step(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Read the next block, run every batch through it, drop it; the rows of its output."""
        from .capture import first_tensor, keep_inputs

        l = self.layer + 1
        if l >= self.L:
            raise GraftError("internal: the walker is past the last block")
        st, model, progress = self.st, self.model, self.progress
        progress(
            (l + 0.5) / (self.L + 1),
            f"{model.label}: block {l + 1}/{self.L} · "
            f"{st.bytes_read / 1e9:.2f} of {self.total / 1e9:.2f} GB read",
        )
        lin = self.lin
        mine = [m for m in self.modules if lin[m].layer == l]
        mine_in = [m for m in self.module_inputs if lin[m].layer == l]
        d = self.batches[0]["h"].shape[-1]
        out = torch.empty((self.n, d), dtype=torch.float32) if out is None else out
        with st.block(l):
            sink: dict[str, torch.Tensor] = {}
            handles = []
            for m in mine:
                handles.append(
                    model.arch.module(lin[m].path).register_forward_hook(
                        lambda _m, _i, o, m=m: sink.__setitem__(m, o[0] if isinstance(o, tuple) else o)
                    )
                )
            for m in mine_in:
                handles.append(
                    model.arch.module(lin[m].path).register_forward_pre_hook(
                        lambda _m, a, kw, m=m: sink.__setitem__(f"in:{m}", first_tensor(a, kw)),
                        with_kwargs=True,
                    )
                )
            try:
                for bt in self.batches:
                    progress.check()  # a cancel lands between batches, inside a block too
                    sink.clear()
                    rest, kw = bt["calls"][l]
                    bt["h"] = _run_block(self.blocks[l], bt["h"], rest, kw)
                    out.index_copy_(0, bt["dest"], self._take(bt["h"], bt["rows"]).float().cpu())
                    for m in mine:
                        self.per_module[m].append(self._take(sink[m], bt["rows"]).float().cpu())
                    keep_inputs(
                        sink, mine_in, self.shares, self.per_input, lambda t, bt=bt: self._take(t, bt["rows"])
                    )
            finally:
                for h in handles:
                    h.remove()
        self.layer = l
        return out

    def skeleton(self, resid: Optional[torch.Tensor] = None) -> Any:
        """The :class:`~engine.measure.capture.Capture` of this workload: texts, token ids, offsets and
        text of every row, with ``resid`` as its residual stream (``(0, n, d)`` when None: the row
        alignment of two walkers needs no rows)."""
        from .capture import finish_capture

        if resid is None:
            resid = torch.empty((0, self.n, self.batches[0]["h"].shape[-1]), dtype=torch.float32)
        dests = [bt["dest"] for bt in self.batches]
        return finish_capture(
            self.model,
            self.texts,
            self.enc,
            self.fast,
            resid,
            self.per_module,
            self.per_input,
            self.shares,
            dests,
        )


@torch.inference_mode()
def capture_streamed(
    model: LoadedModel,
    texts: Sequence[str],
    *,
    modules: Sequence[str] = (),
    module_inputs: Sequence[str] = (),
    residual: bool = True,
    batch_size: int = 8,
    progress: Optional[Progress] = None,
) -> Any:
    progress = progress or silent()
    with model.lock:
        walk = LayerWalker(
            model,
            texts,
            batch_size=batch_size,
            progress=progress,
            modules=modules,
            module_inputs=module_inputs,
        )
        L, n = walk.L, walk.n
        d = model.arch.hidden_size
        resid = torch.empty((L + 1 if residual else 0, n, d), dtype=torch.float32)
        scratch = None if residual else torch.empty((n, d), dtype=torch.float32)
        if residual:
            walk.embeddings(resid[0])
        for l in range(L):
            walk.step(resid[l + 1] if residual else scratch)
    progress(1.0, f"{model.label}: captured, {model.stream.bytes_read / 1e9:.2f} GB read")
    return walk.skeleton(resid)
