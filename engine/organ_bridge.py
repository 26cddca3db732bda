"""Bridges around an inserted organ (METHODS.md T10) and the residual-stream rows they are fitted on.

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

import json
import weakref
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .capture import _first_tensor, _hidden
from .errors import GraftError
from .outputs import share_like_new
from .evaluate import encode_text, model_device, pad_id
from .progress import Progress, silent

BRIDGES_FILE = "bridges.safetensors"
ORGAN_BLOCKS_FILE = "organ_blocks.safetensors"
ATTR = "graft_bridges"


class Bridge(nn.Module):
    """``W_in``/``b_in`` before block ``first`` and ``W_out``/``b_out`` after block ``last``.

    ``d`` is the recipient's width and ``d_organ`` the organ's (default ``d``). Across widths
    ``W_in`` is ``d x d_organ`` and ``W_out`` ``d_organ x d``, and "identity" is the rectangular
    identity ``I[:d, :d_organ]`` (keep the first coordinates, pad with zeros)."""

    def __init__(self, d: int, first: int, last: int, device: Any = None, dtype: Any = None,
                 d_organ: Optional[int] = None) -> None:
        super().__init__()
        self.first, self.last = int(first), int(last)
        do = d if d_organ is None else int(d_organ)
        self.w_in = nn.Parameter(torch.eye(d, do, device=device, dtype=dtype), requires_grad=False)
        self.b_in = nn.Parameter(torch.zeros(do, device=device, dtype=dtype), requires_grad=False)
        self.w_out = nn.Parameter(torch.eye(do, d, device=device, dtype=dtype), requires_grad=False)
        self.b_out = nn.Parameter(torch.zeros(d, device=device, dtype=dtype), requires_grad=False)

    def pre_hook(self, _mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (args[0] @ self.w_in + self.b_in, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"] @ self.w_in + self.b_in
        return args, kwargs

    def post_hook(self, _mod: nn.Module, _args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0] @ self.w_out + self.b_out, *output[1:])
        return output @ self.w_out + self.b_out

    @torch.no_grad()
    def set(self, which: str, W: torch.Tensor, b: torch.Tensor) -> None:
        getattr(self, f"w_{which}").copy_(W.to(self.w_in.dtype))
        getattr(self, f"b_{which}").copy_(b.to(self.w_in.dtype))

    def identity(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The starting point of ``W_which`` and its bias (float64): the (rectangular) identity and 0."""
        w = getattr(self, f"w_{which}")
        return torch.eye(*w.shape, dtype=torch.float64), torch.zeros(w.shape[1], dtype=torch.float64)

    def deviation(self) -> dict[str, float]:
        """``||W_in - I||_F`` and ``||W_out - I||_F`` (float64; I rectangular across widths)."""
        return {k: float(torch.linalg.matrix_norm(getattr(self, f"w_{k}").detach().double().cpu() - self.identity(k)[0]))
                for k in ("in", "out")}


class BridgeSet(nn.Module):
    """The bridges of one model, with the hooks that apply them."""

    def __init__(self) -> None:
        super().__init__()
        self.items = nn.ModuleList()

    def hook(self, blocks: nn.ModuleList) -> None:
        self.unhook()
        handles = _HANDLES.setdefault(self, [])
        for br in self.items:
            handles.append(blocks[br.first].register_forward_pre_hook(br.pre_hook, with_kwargs=True))
            handles.append(blocks[br.last].register_forward_hook(br.post_hook))

    def unhook(self) -> None:
        for h in _HANDLES.pop(self, []):
            h.remove()


# Hook handles live outside the module so that a deep copy of a bridged model stays plain data.
_HANDLES: "weakref.WeakKeyDictionary[BridgeSet, list[Any]]" = weakref.WeakKeyDictionary()


def install(model: nn.Module, blocks: nn.ModuleList, bridges: BridgeSet) -> None:
    setattr(model, ATTR, bridges)
    bridges.hook(blocks)


def uninstall(model: nn.Module) -> None:
    bs = getattr(model, ATTR, None)
    if isinstance(bs, BridgeSet):
        bs.unhook()
        delattr(model, ATTR)


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
    W = torch.linalg.solve(A, Xc.T @ Yc + lam * torch.eye(d, Y.shape[1], dtype=torch.float64))  # prior: (rectangular) I
    return W, my - mx @ W


@torch.inference_mode()
def stream_rows(model: nn.Module, blocks: nn.ModuleList, tokenizer: Any, texts: Sequence[str],
                taps: Sequence[tuple[str, int]], *, max_length: int = 128, max_rows: int = 4096,
                batch_size: int = 8, progress: Optional[Progress] = None) -> dict[tuple[str, int], torch.Tensor]:
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
            handles.append(blocks[i].register_forward_pre_hook(
                lambda _m, a, kw, key=(kind, i): sink.__setitem__(key, _first_tensor(a, kw)), with_kwargs=True, prepend=raw))
        else:
            handles.append(blocks[i].register_forward_hook(
                lambda _m, _a, o, key=(kind, i): sink.__setitem__(key, _hidden(o)), prepend=raw))
    rows: dict[tuple[str, int], list[torch.Tensor]] = {t: [] for t in taps}
    n = 0
    fill = pad_id(tokenizer)
    try:
        encoded = [encode_text(tokenizer, t, max_length) for t in texts]
        for b0 in range(0, len(encoded), batch_size):
            progress(b0 / max(len(encoded), 1), "capturing the residual stream")
            seqs = encoded[b0:b0 + batch_size]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), fill, dtype=torch.long, device=dev)
            mask = torch.zeros((len(seqs), width), dtype=torch.long, device=dev)
            for r, s in enumerate(seqs):
                ids[r, :len(s)] = torch.tensor(s, device=dev)
                mask[r, :len(s)] = 1
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
    return {f"{j}.{name}": p.detach().cpu().contiguous() for j, br in enumerate(bridges.items)
            for name, p in br.named_parameters()}


def save_bridges(bridges: BridgeSet, folder: Path) -> None:
    """Write ``bridges.safetensors`` into a saved transplant folder."""
    from safetensors.torch import save_file

    save_file(bridge_tensors(bridges), str(folder / BRIDGES_FILE), metadata={"format": "graft-bridges/1"})
    share_like_new(folder / BRIDGES_FILE)  # safetensors writes 0600


def bridges_entry(bridges: BridgeSet) -> dict[str, Any]:
    """The surgery.json entry that describes saved bridges (what :func:`attach_saved_bridges` reads)."""
    return {"storage": "modules", "file": BRIDGES_FILE, "folded": False,
            "placements": [{"first": br.first, "last": br.last} for br in bridges.items],
            "note": "affine bridges y = x W + b on the residual stream, applied before block 'first' and after block "
                    "'last'; not foldable exactly into adjacent weights, so kept as modules that Graft's loader "
                    "re-attaches (a plain transformers load ignores them)"}


def attach_saved_bridges(model: nn.Module, folder: Path) -> bool:
    """Re-attach the bridges of a saved bridged transplant (``surgery.json`` + ``bridges.safetensors``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card_path, file = folder / "surgery.json", folder / BRIDGES_FILE
    if not file.is_file():
        return False
    try:
        entry = json.loads(card_path.read_text())["bridges"]
        placements = entry["placements"]
        tensors = load_file(str(file))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise GraftError(f"{folder} has {BRIDGES_FILE} but its surgery.json does not describe the bridges ({e})") from None
    from .arch import ArchAdapter

    blocks = ArchAdapter(model).blocks
    bs = BridgeSet()
    for j, pl in enumerate(placements):
        w = tensors[f"{j}.w_in"]
        br = Bridge(w.shape[0], pl["first"], pl["last"], device=w.device, dtype=w.dtype, d_organ=w.shape[1])
        for name in ("w_in", "b_in", "w_out", "b_out"):
            getattr(br, name).data.copy_(tensors[f"{j}.{name}"])
        bs.items.append(br)
    if entry.get("organ_blocks"):
        _attach_organ_blocks(model, blocks, folder, entry["organ_blocks"])
    install(model, blocks, bs)
    return True


def save_organ_blocks(blocks: dict[int, nn.Module], fields: dict[int, dict[str, Any]], folder: Path) -> dict[str, Any]:
    """Write blocks of another width (``{index: block}``) into ``organ_blocks.safetensors``; returns the
    surgery.json entry that :func:`attach_saved_bridges` reads (each block's index and architecture)."""
    from safetensors.torch import save_file

    save_file({f"{i}.{k}": v.detach().cpu().contiguous() for i, b in blocks.items() for k, v in b.state_dict().items()},
              str(folder / ORGAN_BLOCKS_FILE), metadata={"format": "graft-organ-blocks/1"})
    share_like_new(folder / ORGAN_BLOCKS_FILE)
    return {"file": ORGAN_BLOCKS_FILE, "blocks": [{"index": i, "architecture": fields[i]} for i in sorted(blocks)],
            "note": "blocks of the organ's own width, between the bridges; the Hugging Face weights hold the recipient's "
                    "blocks at these indices, and Graft's loader puts these in their place"}


def _attach_organ_blocks(model: nn.Module, blocks: nn.ModuleList, folder: Path, entry: dict[str, Any]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .arch import ArchAdapter
    from .organ import block_of_width

    try:
        tensors = load_file(str(folder / entry["file"]))
        arch = ArchAdapter(model)
        p = next(model.parameters())
        for item in entry["blocks"]:
            i = int(item["index"])
            block = block_of_width(arch, item["architecture"], i).to(device=p.device, dtype=p.dtype)
            block.load_state_dict({k[len(f"{i}."):]: v for k, v in tensors.items() if k.startswith(f"{i}.")}, strict=True)
            for prm in block.parameters():
                prm.requires_grad_(False)
            blocks[i] = block.eval()
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as e:
        raise GraftError(f"{folder}: the organ blocks beside the weights cannot be put back ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
