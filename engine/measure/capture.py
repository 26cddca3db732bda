"""Activation capture: one forward pass per model per batch, hooks removed in ``finally``.

The pass runs the model's backbone only (:func:`backbone`): nothing captured needs the logits.

Captures the residual stream ``h_l`` after every block (and ``h_{-1}``, the input of block 0,
which includes position/scale terms some families add to the embeddings), and optionally the
outputs and/or the inputs of chosen linear modules. Only non-padding, non-special tokens become
rows, as float32, in workload order; a token budget bounds memory. Texts are tokenized once and
batched by length (:func:`engine.measure.budget.length_batches`), so padding costs little; each batch's rows
go straight to their place in the stream. Module rows go to the CPU batch by batch. On CUDA
the residual stream stays on the GPU while it fits (T2-T4 compute there) and is copied to the host
only when asked for (:attr:`Capture.residual`); on a CPU it is there already.

A module's input is what its forward receives (``input[0]``): for a block's q/k/v or gate/up that
is the stream *after* the block's norm, for o the concatenated heads, for down the MLP hidden
state. Modules fed the very same tensor in a forward pass (Llama's q, k and v; gate and up) share
one captured tensor instead of holding copies.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..core.errors import GraftError
from ..core.progress import Progress, silent
from ..loading.models import LoadedModel
from .budget import MAX_TOKENS_PER_TEXT, length_batches


@dataclass
class Capture:
    """Activations of one model on one workload.

    residual: (L+1, n, d) float32 CPU; index 0 is h_{-1} (input of block 0), index l+1 is h_l
    (``rows()``: the same on the GPU, when the capture ran there and kept it).
    modules: name -> (n, out_features) float32 CPU, names as in :mod:`engine.loading.arch`.
    module_inputs: name -> (n, in_features) float32 CPU, the rows each module reads (modules fed
    the same tensor share one tensor object here).
    residual: (0, n, d) when captured with ``residual=False`` (only the row count is kept).
    text_index: (n,) which text each row came from; offsets: (n, 2) character span of the token.
    """

    label: str
    texts: list[str]
    residual_host: Optional[torch.Tensor]  # None while the rows are on the device only (see residual)
    text_index: torch.Tensor
    offsets: Optional[torch.Tensor]
    token_ids: list[list[int]]
    modules: dict[str, torch.Tensor] = field(default_factory=dict)
    module_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    derived: dict = field(default_factory=dict, repr=False)  # memo of results computed from this capture
    # The residual stream on the model's CUDA device, when the capture ran there and it fit: T2-T4
    # compute on it there, so it never crosses to the host and back (engine.measure.align,
    # engine.running.context).
    residual_device: Optional[torch.Tensor] = None

    @property
    def residual(self) -> torch.Tensor:
        """(L+1, n, d) float32 on the CPU, copied from the device the first time it is asked for."""
        if self.residual_host is None:
            self.residual_host = self.residual_device.cpu()
        return self.residual_host

    def rows(self) -> torch.Tensor:
        """The residual stream where it is: on the device when it stayed there, else on the CPU."""
        return self.residual_device if self.residual_device is not None else self.residual

    @property
    def n(self) -> int:
        return int(self.rows().shape[1])


def backbone(model: LoadedModel) -> torch.nn.Module:
    """The module to run for a capture: the model's base (embeddings, blocks, final norm) when its
    blocks live there, so no logits are computed (the LM head is about a fifth of SmolLM2's
    forward time and more than half of Gemma-3-270M's, and nothing captured depends on it); else
    the model."""
    base = getattr(model.model, "base_model", None)
    if isinstance(base, torch.nn.Module) and base is not model.model:
        first = model.arch.blocks[0]
        if any(m is first for m in base.modules()):
            return base
    return model.model


def hidden_state(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor a linear module's forward was called with (positional, or the first keyword)."""
    if args:
        return args[0]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise GraftError("internal: a hooked linear module was called without a tensor input")


class _ResidualRows:
    """One batch's kept rows of the residual stream, gathered while the forward pass runs: each
    block's output gives up its rows as soon as it is computed, so the pass frees its hidden states
    as a bare pass does (holding all of them until the pass ends made the capture of the demo pair
    up to 20% slower than the bare backbone on two threads, and its peak memory grow with depth)."""

    def __init__(self, n_layers: int, rows: torch.Tensor) -> None:
        self.rows = rows  # flat indices of the kept tokens in (batch x positions), on the model's device
        self.block: Optional[torch.Tensor] = None  # (L+1, n_b, d), in the hidden states' dtype
        self.filled = [False] * (n_layers + 1)

    def put(self, l: int, h: torch.Tensor) -> None:
        """Rows of h_l (l = -1 for the input of block 0)."""
        flat = h.reshape(-1, h.shape[-1])
        if self.block is None:
            self.block = torch.empty(
                len(self.filled), self.rows.numel(), flat.shape[-1], dtype=flat.dtype, device=flat.device
            )
        torch.index_select(flat, 0, self.rows, out=self.block[l + 1])
        self.filled[l + 1] = True

    def result(self) -> torch.Tensor:
        if self.block is None or not all(self.filled):
            missing = [l - 1 for l, f in enumerate(self.filled) if not f]
            raise GraftError(
                f"internal: the forward pass did not run every block (no output for layer(s) {missing[:5]})"
            )
        return self.block


@contextmanager
def _hooks(
    model: LoadedModel,
    module_paths: dict[str, str],
    sink: dict[str, torch.Tensor],
    input_paths: Optional[dict[str, str]] = None,
    residual: Optional[_ResidualRows] = None,
) -> Iterator[None]:
    handles = []
    blocks = model.arch.blocks

    def pre_hook(_mod, args, kwargs):
        residual.put(-1, args[0] if args else kwargs.get("hidden_states"))

    if residual is not None:
        handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for l, block in enumerate(blocks):
            handles.append(
                block.register_forward_hook(lambda _m, _i, o, l=l: residual.put(l, hidden_state(o)))
            )
    for name, path in module_paths.items():
        mod = model.arch.module(path)
        handles.append(
            mod.register_forward_hook(lambda _m, _i, o, name=name: sink.__setitem__(name, hidden_state(o)))
        )
    for name, path in (input_paths or {}).items():
        mod = model.arch.module(path)
        handles.append(
            mod.register_forward_pre_hook(
                lambda _m, a, kw, name=name: sink.__setitem__(f"in:{name}", first_tensor(a, kw)),
                with_kwargs=True,
            )
        )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def encode_texts(
    tok, texts: Sequence[str], max_length: int, fast: bool
) -> list[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]]:
    """Every text tokenized once, unpadded: (ids, kept positions, character spans or None). Kept:
    not a special token and, with a fast tokenizer, spanning at least one character."""
    enc = tok(
        list(texts),
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=fast,
        return_special_tokens_mask=True,
    )
    out = []
    for k, ids in enumerate(enc["input_ids"]):
        keep = ~np.asarray(enc["special_tokens_mask"][k], dtype=bool).reshape(-1)
        off = None
        if fast:
            off = np.asarray(enc["offset_mapping"][k], dtype=np.int64).reshape(-1, 2)
            keep &= off[:, 1] > off[:, 0]
        out.append((np.asarray(ids, dtype=np.int64).reshape(-1), keep, off))
    return out


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``. To CUDA through pinned memory without waiting: a plain copy
    would wait for the GPU to finish the batches already queued."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def in_order(parts: list[torch.Tensor], dests: list[torch.Tensor], n: int) -> torch.Tensor:
    """Module rows of the batches in workload order: part k's rows go to rows dests[k]."""
    out = torch.empty((n,) + tuple(parts[0].shape[1:]), dtype=parts[0].dtype)
    for part, dest in zip(parts, dests):
        out.index_copy_(0, dest, part)
    return out


@torch.inference_mode()
def capture(
    model: LoadedModel,
    texts: Sequence[str],
    *,
    modules: Sequence[str] = (),
    module_inputs: Sequence[str] = (),
    residual: bool = True,
    batch_size: int = 8,
    progress: Optional[Progress] = None,
) -> Capture:
    """Run ``texts`` (already budgeted) through ``model`` once, capturing rows of every layer.

    ``modules``: linear modules whose outputs are captured; ``module_inputs``: linear modules
    whose inputs are captured (canonical names, :mod:`engine.loading.arch`). ``residual=False`` skips the
    residual stream (``Capture.residual`` is then ``(0, n, d)``), for passes that only need
    module rows; the rows are the same tokens in the same order either way.
    """
    if model.streamed:
        raise GraftError(
            f"internal: {model.label} streams; capture it with engine.measure.capture_cache.capture_model"
        )
    progress = progress or silent()
    tok = model.tokenizer
    from ..loading.tokens import context_length, pad_id, pad_right

    max_length = min(MAX_TOKENS_PER_TEXT, context_length(model.model))
    lin, modules, module_inputs = requested_modules(model, modules, module_inputs)
    module_paths = {m: lin[m].path for m in modules}
    input_paths = {m: lin[m].path for m in module_inputs}
    L = model.arch.n_layers
    per_module: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    per_input: dict[str, list[torch.Tensor]] = {m: [] for m in module_inputs}
    # shares[m] = the module whose captured input m shares in every batch so far (None = own copy)
    shares: dict[str, Optional[str]] = {}
    dests: list[torch.Tensor] = []  # per batch: the final row of each of its rows (workload order)
    fast = bool(getattr(tok, "is_fast", False))
    enc = encode_texts(tok, texts, max_length, fast)  # per text: ids, kept positions, character spans
    counts = [int(keep.sum()) for _, keep, _ in enc]
    starts = np.cumsum([0] + counts)
    n_rows = int(starts[-1])
    if n_rows == 0:
        raise GraftError("the workload produced no tokens")
    # The whole stream at once, each batch's rows copied to their place as the batch ends: no
    # concatenation doubling it at the end. On CUDA it stays there when it fits.
    shape = (L + 1, n_rows, model.arch.hidden_size) if residual else (0, n_rows, model.arch.hidden_size)
    on_device = (
        residual and model.device.type == "cuda" and _fits(4 * shape[0] * n_rows * shape[2], model.device)
    )
    resid = torch.empty(shape, dtype=torch.float32, device=model.device if on_device else "cpu")
    fill = pad_id(tok)
    net = backbone(model)
    done = 0
    for idx in length_batches([len(ids) for ids, _, _ in enc], batch_size):
        progress(done / max(len(texts), 1), f"{model.label}: forward {done}/{len(texts)} texts")
        done += len(idx)
        if not any(counts[i] for i in idx):
            continue  # no row to keep (texts of special tokens only): no pass
        ids, mask = pad_right([enc[i][0] for i in idx], fill, torch.device("cpu"))  # (B, T) on the host
        dests.append(torch.from_numpy(np.concatenate([np.arange(starts[i], starts[i + 1]) for i in idx])))
        sink: dict[str, torch.Tensor] = {}
        inputs = {"input_ids": to_device(ids, model.device), "attention_mask": to_device(mask, model.device)}
        # The kept rows' flat indices in (B x T), found once on the host: on CUDA a boolean mask per
        # layer would wait for the device each time, and so would a copy to the host per layer.
        T = ids.shape[1]
        rows_dev = to_device(
            torch.from_numpy(np.concatenate([r * T + np.flatnonzero(enc[i][1]) for r, i in enumerate(idx)])),
            model.device,
        )
        take = lambda t: t.reshape(-1, t.shape[-1]).index_select(0, rows_dev)  # noqa: E731  (n_b, d)
        gathered = _ResidualRows(L, rows_dev) if residual else None
        with model.lock, _hooks(model, module_paths, sink, input_paths, gathered):
            net(**inputs, use_cache=False)  # on CUDA no wait here: the host prepares the next batch meanwhile
        if gathered is not None:  # (L+1, n_b, d): one copy to the host per batch if it goes there
            resid.index_copy_(
                1, to_device(dests[-1], resid.device), gathered.result().float().to(resid.device)
            )
        for m in modules:
            per_module[m].append(take(sink[m]).float().cpu())
        keep_inputs(sink, module_inputs, shares, per_input, take)
    progress(1.0, f"{model.label}: captured")
    if (
        model.device.type == "cuda"
    ):  # the batches queued without waiting: the capture ends when the GPU is done
        torch.cuda.synchronize(model.device)
    return finish_capture(model, texts, enc, fast, resid, per_module, per_input, shares, dests)


def requested_modules(
    model: LoadedModel, modules: Sequence[str], module_inputs: Sequence[str]
) -> tuple[dict[str, Any], list[str], list[str]]:
    """The model's linear modules by name, and the requested output and input captures without
    repeats; a GraftError naming the first unknown names."""
    lin = {m.name: m for m in model.arch.linear_modules()}
    modules, module_inputs = list(dict.fromkeys(modules)), list(dict.fromkeys(module_inputs))
    unknown = [m for m in modules + module_inputs if m not in lin]
    if unknown:
        raise GraftError(f"unknown module(s) for {model.label}: {', '.join(unknown[:3])}")
    return lin, modules, module_inputs


def keep_inputs(
    sink: dict[str, torch.Tensor],
    names: Sequence[str],
    shares: dict[str, Optional[str]],
    per_input: dict[str, list[torch.Tensor]],
    take: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """One batch's captured module inputs: a module fed the very tensor an earlier module read
    (Llama's q, k and v; gate and up) keeps a reference to that module's rows, not a copy.
    ``shares[m]``: the module whose input m has shared in every batch so far (None = own copy)."""
    first_of: dict[int, str] = {}  # id of a hooked input tensor -> first module that read it
    for m in names:
        t = sink[f"in:{m}"]
        owner = first_of.setdefault(id(t), m)
        same = owner != m and shares.get(m, owner) == owner
        shares[m] = owner if same else None
        per_input[m].append(per_input[owner][-1] if same else take(t).float().cpu())  # (n_b, in)


def finish_capture(
    model: LoadedModel,
    texts: Sequence[str],
    enc: list,
    fast: bool,
    resid: torch.Tensor,
    per_module: dict[str, list[torch.Tensor]],
    per_input: dict[str, list[torch.Tensor]],
    shares: dict[str, Optional[str]],
    dests: list[torch.Tensor],
) -> Capture:
    """The :class:`Capture` from the batches' rows: module rows in workload order, checked finite;
    a module that read its owner's tensor in every batch shares the owner's rows (one copy)."""
    n_rows = int(resid.shape[1])
    counts = [int(keep.sum()) for _, keep, _ in enc]
    modules_rows = {m: in_order(v, dests, n_rows) for m, v in per_module.items()}
    finite_or_raise(model, resid, modules_rows)
    inputs: dict[str, torch.Tensor] = {}
    for m in per_input:
        owner = shares.get(m)
        inputs[m] = inputs[owner] if owner is not None else in_order(per_input[m], dests, n_rows)
    return Capture(
        label=model.label,
        texts=list(texts),
        residual_host=None if resid.is_cuda else resid,
        residual_device=resid if resid.is_cuda else None,
        text_index=torch.repeat_interleave(torch.arange(len(enc)), torch.tensor(counts, dtype=torch.long)),
        offsets=torch.cat([torch.from_numpy(off[keep]) for _, keep, off in enc]) if fast else None,
        token_ids=[ids[keep].tolist() for ids, keep, _ in enc],
        modules=modules_rows,
        module_inputs=inputs,
    )


def finite_or_raise(model: LoadedModel, resid: torch.Tensor, modules: dict[str, torch.Tensor]) -> None:
    """A GraftError naming where the captured rows first stop being finite, and why if it can tell:
    every diagnostic of NaN or inf rows is undefined (an SVD of them fails outright). One float32
    sum per layer screens (a NaN or inf anywhere makes it non-finite: 12 ms for 31 layers of 7,902
    rows x 576, where a float64 sum took 400 ms); only a non-finite sum is checked value by value,
    since finite rows can overflow a float32 sum."""
    parts = [(f"{'the embeddings' if l == 0 else f'block {l - 1}'}", resid[l]) for l in range(resid.shape[0])]
    parts += [(f"module {m}", t) for m, t in modules.items()]
    for where, rows in parts:
        if rows.numel() and not bool(torch.isfinite(rows.sum())):
            n_bad = int((~torch.isfinite(rows).all(dim=1)).sum())
            if n_bad == 0:
                continue  # large finite values whose float32 sum overflowed
            bad_weight = next(
                (
                    n
                    for n, p in model.model.named_parameters()
                    if p.device.type != "meta" and not bool(torch.isfinite(p).all())
                ),
                None,
            )
            why = (
                f"its weights hold NaN or inf (first in {bad_weight})"
                if bad_weight
                else "float16 overflows in this model: run it in bfloat16 or float32 (--dtype)"
                if model.dtype == torch.float16
                else "its weights are finite, so the forward pass overflowed"
            )
            raise GraftError(
                f"{model.label} gives NaN or inf activations from {where} on ({n_bad} of {rows.shape[0]} "
                f"token rows): {why}"
            )


DEVICE_SHARE = 0.25  # a capture keeps its residual stream on the GPU while 4x its size fits in free memory


def _fits(nbytes: int, device: torch.device) -> bool:
    """Whether a residual stream of ``nbytes`` may stay on ``device``: what T2-T4 then make of
    it (float64 layers, centred copies, Gram blocks) must fit too, as for
    :func:`engine.measure.linalg.compute_device`."""
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_SHARE * free
