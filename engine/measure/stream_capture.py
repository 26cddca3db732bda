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
    from ..loading.tokens import context_length, pad_id, pad_right
    from .capture import (
        backbone,
        encode_texts,
        finish_capture,
        first_tensor,
        keep_inputs,
        requested_modules,
        to_device,
    )

    progress = progress or silent()
    st = model.stream
    tok = model.tokenizer
    max_length = min(MAX_TOKENS_PER_TEXT, context_length(model.model))
    lin, modules, module_inputs = requested_modules(model, modules, module_inputs)
    L = model.arch.n_layers
    d = model.arch.hidden_size
    fast = bool(getattr(tok, "is_fast", False))
    enc = encode_texts(tok, texts, max_length, fast)
    counts = [int(keep.sum()) for _, keep, _ in enc]
    starts = np.cumsum([0] + counts)
    n_rows = int(starts[-1])
    if n_rows == 0:
        raise GraftError("the workload produced no tokens")
    resid = torch.empty((L + 1 if residual else 0, n_rows, d), dtype=torch.float32)
    fill = pad_id(tok)
    net = backbone(model)
    blocks = model.arch.blocks

    # 1. dry pass: h_{-1} and every block's arguments, per batch
    batches: list[dict[str, Any]] = []
    total = sum(st.block_bytes(l) for l in range(L)) + sum(
        st.index.entries[st.keys[n]].nbytes for n in st.outside_params()
    )
    progress(0.0, f"{model.label}: reading embeddings")
    with model.lock:
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
                    if len(calls) != L or not first:
                        raise GraftError(
                            f"internal: the dry pass of {model.label} reached {len(calls)} of {L} blocks"
                        )
                    rows = torch.from_numpy(
                        np.concatenate([r * T + np.flatnonzero(enc[i][1]) for r, i in enumerate(idx)])
                    )
                    dest = torch.from_numpy(
                        np.concatenate([np.arange(starts[i], starts[i + 1]) for i in idx])
                    )
                    batches.append(
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

        def take(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return h.reshape(-1, h.shape[-1]).index_select(0, rows)

        if residual:
            for bt in batches:
                resid[0].index_copy_(0, bt["dest"], take(bt["h"], bt["rows"]).float().cpu())
        per_module: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
        per_input: dict[str, list[torch.Tensor]] = {m: [] for m in module_inputs}
        shares: dict[str, Optional[str]] = {}
        # 2. block by block
        for l in range(L):
            read = st.bytes_read
            progress(
                (l + 0.5) / (L + 1),
                f"{model.label}: block {l + 1}/{L} · {read / 1e9:.2f} of {total / 1e9:.2f} GB read",
            )
            mine = [m for m in modules if lin[m].layer == l]
            mine_in = [m for m in module_inputs if lin[m].layer == l]
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
                    for bt in batches:
                        progress.check()  # a cancel lands between batches, inside a block too
                        sink.clear()
                        rest, kw = bt["calls"][l]
                        bt["h"] = _run_block(blocks[l], bt["h"], rest, kw)
                        if residual:
                            resid[l + 1].index_copy_(0, bt["dest"], take(bt["h"], bt["rows"]).float().cpu())
                        for m in mine:
                            per_module[m].append(take(sink[m], bt["rows"]).float().cpu())
                        keep_inputs(sink, mine_in, shares, per_input, lambda t: take(t, bt["rows"]))
                finally:
                    for h in handles:
                        h.remove()
    dests = [bt["dest"] for bt in batches]
    progress(1.0, f"{model.label}: captured, {st.bytes_read / 1e9:.2f} GB read")
    return finish_capture(model, texts, enc, fast, resid, per_module, per_input, shares, dests)
