"""What a saved bridged organ transplant carries besides its Hugging Face weights, and how Graft's
loader puts it back: affine bridges on the residual stream (:class:`Bridge`, :class:`BridgeSet`,
applied by hooks) and organ blocks of another width (:func:`block_of_width`).

The bridges are fitted and trained in :mod:`engine.surgery.organ_bridge`; this module only defines
them and re-attaches saved ones (:func:`attach_saved_bridges`), so loading a model never reaches up
into surgery. Every path read from ``surgery.json`` must resolve inside the folder."""

from __future__ import annotations

import copy
import weakref
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..core.errors import GraftError
from ..core.jsonio import inside, read_json_file
from .arch import ArchAdapter

BRIDGES_FILE = "bridges.safetensors"
ORGAN_BLOCKS_FILE = "organ_blocks.safetensors"
ATTR = "graft_bridges"


class Bridge(nn.Module):
    """``W_in``/``b_in`` before block ``first`` and ``W_out``/``b_out`` after block ``last``.

    ``d`` is the recipient's width and ``d_organ`` the organ's (default ``d``). Across widths
    ``W_in`` is ``d x d_organ`` and ``W_out`` ``d_organ x d``, and "identity" is the rectangular
    identity ``I[:d, :d_organ]`` (keep the first coordinates, pad with zeros)."""

    def __init__(
        self,
        d: int,
        first: int,
        last: int,
        device: Any = None,
        dtype: Any = None,
        d_organ: Optional[int] = None,
    ) -> None:
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
        return {
            k: float(
                torch.linalg.matrix_norm(
                    getattr(self, f"w_{k}").detach().double().cpu() - self.identity(k)[0]
                )
            )
            for k in ("in", "out")
        }


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


def attach_saved_bridges(model: nn.Module, folder: Path) -> bool:
    """Re-attach the bridges of a saved bridged transplant (``surgery.json`` + ``bridges.safetensors``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card_path, file = folder / "surgery.json", folder / BRIDGES_FILE
    if not file.is_file():
        return False
    card = read_json_file(card_path, f"{folder}/surgery.json")
    try:
        entry = card["bridges"]
        placements = entry["placements"]
        tensors = load_file(str(file))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise GraftError(
            f"{folder} has {BRIDGES_FILE} but its surgery.json does not describe the bridges ({e})"
        ) from None
    blocks = ArchAdapter(model).blocks
    bs = BridgeSet()
    for j, pl in enumerate(placements):
        w = tensors[f"{j}.w_in"]
        br = Bridge(w.shape[0], pl["first"], pl["last"], device=w.device, dtype=w.dtype, d_organ=w.shape[1])
        for name in ("w_in", "b_in", "w_out", "b_out"):
            getattr(br, name).data.copy_(tensors[f"{j}.{name}"])
        bs.items.append(br)
    if entry.get("organ_blocks"):
        attach_organ_blocks(model, blocks, folder, entry["organ_blocks"])
    install(model, blocks, bs)
    return True


def block_of_width(arch: ArchAdapter, fields: dict[str, Any], index: int) -> nn.Module:
    """A new block of ``arch``'s block class at block ``index``, built from its model's config with the
    hidden size (and head size) of ``fields`` (an organ card's architecture): an organ of another
    width, same block internals, runs inside the recipient between its bridges. Random weights
    (float32, CPU) until an organ's tensors are loaded into it."""
    cfg = copy.deepcopy(arch.text_config)
    cfg.hidden_size = int(fields["hidden_size"])
    if fields.get("head_dim") and hasattr(cfg, "head_dim"):  # else derived from the width: keep the organ's
        cfg.head_dim = int(fields["head_dim"])
    cls = type(arch.blocks[index])
    with torch.inference_mode(False):
        try:
            return cls(cfg, layer_idx=index)
        except TypeError:
            return cls(cfg, index)


def attach_organ_blocks(model: nn.Module, blocks: nn.ModuleList, folder: Path, entry: dict[str, Any]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        rel = entry.get("file") if isinstance(entry, dict) else None
        tensors = load_file(str(inside(folder, rel, "surgery.json bridges.organ_blocks.file")))
        arch = ArchAdapter(model)
        p = next(model.parameters())
        for item in entry["blocks"]:
            i = int(item["index"])
            block = block_of_width(arch, item["architecture"], i).to(device=p.device, dtype=p.dtype)
            block.load_state_dict(
                {k[len(f"{i}.") :]: v for k, v in tensors.items() if k.startswith(f"{i}.")}, strict=True
            )
            for prm in block.parameters():
                prm.requires_grad_(False)
            blocks[i] = block.eval()
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as e:
        raise GraftError(
            f"{folder}: the organ blocks beside the weights cannot be put back "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
