"""Bridges around an inserted organ (docs/methods.md T10) and the residual-stream rows they are fitted on.

A bridge is an affine map of the residual stream, on row vectors: ``y = x W + b``. ``W_in`` is
applied to the stream entering the organ's first block, ``W_out`` to the stream leaving its last.
Both start at the identity (``W = I``, ``b = 0``). :func:`closed_form` fits one in closed form,
as T4 does: ridge least squares between the activations it connects, shrunk towards the identity,

    W = (Xc^T Xc + lam I)^{-1} (Xc^T Yc + lam I),    b = mean(Y) - mean(X) W,

with ``Xc``, ``Yc`` the centred rows and ``lam = alpha * trace(Xc^T Xc) / d``; so ``Y = X`` gives
``W = I`` exactly, and a planted ``Y = X Q`` is recovered as ``lam -> 0``.

The bridges act through forward hooks on the organ's first and last block (a pre-hook on the
first, a hook on the last), so every block keeps its own class, ``state_dict`` names and the
model's own forward (position embeddings, masks, cache). Their parameters live in a
:class:`BridgeSet` attached to the model as ``graft_bridges``, so the model's weight hash covers
them. A saved model keeps them as real modules in ``bridges.safetensors`` (they cannot be folded
exactly into adjacent weights: the residual stream also carries every earlier block's output
through normalisations), and :func:`attach_saved_bridges` re-attaches them when Graft loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..core.errors import GraftError
from ..core.outputs import share_like_new
from ..core.progress import Progress, silent
from ..loading.bridged import ATTR, BRIDGES_FILE, ORGAN_BLOCKS_FILE, Bridge, BridgeSet, install, uninstall  # noqa: F401
from ..loading.tokens import encode_text, model_device, pad_id
from ..measure.capture import first_tensor, hidden_state

# --------------------------------------------------------------------------------------------
# Fitting


def closed_form(X: torch.Tensor, Y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge towards the identity with a bias (see the module docstring); float64 on the CPU."""
    X, Y = X.double().cpu(), Y.double().cpu()
    if X.shape[0] != Y.shape[0]:
        raise GraftError(f"internal: bridge rows do not pair up ({tuple(X.shape)} vs {tuple(Y.shape)})")
    if X.shape[0] < 2:
        raise GraftError(f"too few tokens to fit a bridge ({X.shape[0]}; at least 2): use a larger workload")
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    d = X.shape[1]
    G = Xc.T @ Xc
    lam = alpha * float(torch.trace(G)) / d
    A = G + max(lam, 1e-12 * max(float(torch.trace(G)) / d, 1.0)) * torch.eye(d, dtype=torch.float64)
    W = torch.linalg.solve(
        A, Xc.T @ Yc + lam * torch.eye(d, Y.shape[1], dtype=torch.float64)
    )  # prior: (rectangular) I
    return W, my - mx @ W


@torch.inference_mode()
def stream_rows(
    model: nn.Module,
    blocks: nn.ModuleList,
    tokenizer: Any,
    texts: Sequence[str],
    taps: Sequence[tuple[str, int]],
    *,
    max_length: int = 128,
    max_rows: int = 4096,
    batch_size: int = 8,
    progress: Optional[Progress] = None,
) -> dict[tuple[str, int], torch.Tensor]:
    """Residual-stream rows (non-padding tokens) at each tap: ``("in", i)`` = what block ``i``
    receives (after any bridge pre-hook registered earlier), ``("out", i)`` = what block ``i``
    returns (after any bridge hook); ``("in_raw", i)`` / ``("out_raw", i)``: the same before the
    bridges (the stream a bridge maps). At most ``max_rows`` rows, the same tokens at every tap."""
    progress = progress or silent()
    dev = model_device(model)
    sink: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for kind, i in taps:
        raw = kind.endswith("_raw")  # prepended: runs before the bridge's own hook on this block
        if kind.startswith("in"):
            handles.append(
                blocks[i].register_forward_pre_hook(
                    lambda _m, a, kw, key=(kind, i): sink.__setitem__(key, first_tensor(a, kw)),
                    with_kwargs=True,
                    prepend=raw,
                )
            )
        else:
            handles.append(
                blocks[i].register_forward_hook(
                    lambda _m, _a, o, key=(kind, i): sink.__setitem__(key, hidden_state(o)), prepend=raw
                )
            )
    rows: dict[tuple[str, int], list[torch.Tensor]] = {t: [] for t in taps}
    n = 0
    fill = pad_id(tokenizer)
    try:
        encoded = [encode_text(tokenizer, t, max_length) for t in texts]
        for b0 in range(0, len(encoded), batch_size):
            progress(b0 / max(len(encoded), 1), "capturing the residual stream")
            seqs = encoded[b0 : b0 + batch_size]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), fill, dtype=torch.long, device=dev)
            mask = torch.zeros((len(seqs), width), dtype=torch.long, device=dev)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s, device=dev)
                mask[r, : len(s)] = 1
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            keep = mask.bool()
            for t in taps:
                rows[t].append(sink[t][keep].float().cpu())
            n += int(keep.sum())
            if n >= max_rows:
                break
    finally:
        for h in handles:
            h.remove()
    return {t: torch.cat(v)[:max_rows] for t, v in rows.items()}


# --------------------------------------------------------------------------------------------
# Saving and loading with a model


def bridge_tensors(bridges: BridgeSet) -> dict[str, torch.Tensor]:
    return {
        f"{j}.{name}": p.detach().cpu().contiguous()
        for j, br in enumerate(bridges.items)
        for name, p in br.named_parameters()
    }


def save_bridges(bridges: BridgeSet, folder: Path) -> None:
    """Write ``bridges.safetensors`` into a saved transplant folder."""
    from safetensors.torch import save_file

    save_file(bridge_tensors(bridges), str(folder / BRIDGES_FILE), metadata={"format": "graft-bridges/1"})
    share_like_new(folder / BRIDGES_FILE)  # safetensors writes 0600


def bridges_entry(bridges: BridgeSet) -> dict[str, Any]:
    """The surgery.json entry that describes saved bridges (what :func:`attach_saved_bridges` reads)."""
    return {
        "storage": "modules",
        "file": BRIDGES_FILE,
        "folded": False,
        "placements": [{"first": br.first, "last": br.last} for br in bridges.items],
        "note": "affine bridges y = x W + b on the residual stream, applied before block 'first' and after "
        "block 'last'; not foldable exactly into adjacent weights, so kept as modules that Graft's loader "
        "re-attaches (a plain transformers load ignores them)",
    }


def save_organ_blocks(
    blocks: dict[int, nn.Module], fields: dict[int, dict[str, Any]], folder: Path
) -> dict[str, Any]:
    """Write blocks of another width (``{index: block}``) into ``organ_blocks.safetensors``; returns the
    surgery.json entry that :func:`attach_saved_bridges` reads (each block's index and architecture)."""
    from safetensors.torch import save_file

    save_file(
        {
            f"{i}.{k}": v.detach().cpu().contiguous()
            for i, b in blocks.items()
            for k, v in b.state_dict().items()
        },
        str(folder / ORGAN_BLOCKS_FILE),
        metadata={"format": "graft-organ-blocks/1"},
    )
    share_like_new(folder / ORGAN_BLOCKS_FILE)
    return {
        "file": ORGAN_BLOCKS_FILE,
        "blocks": [{"index": i, "architecture": fields[i]} for i in sorted(blocks)],
        "note": "blocks of the organ's own width, between the bridges; the Hugging Face weights hold the "
        "recipient's "
        "blocks at these indices, and Graft's loader puts these in their place",
    }
