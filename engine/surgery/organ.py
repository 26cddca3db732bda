"""Organs and organ checkpoints (docs/methods.md operation 2, NOT).

An organ is ``k`` contiguous transformer blocks of a source model D, from block ``s`` (defaults
``k = 3``, ``s = floor(L/3)``). It is held as the blocks' tensors, keyed ``"<i>.<name>"`` with
``i`` the block's rank inside the organ and ``name`` its ``state_dict`` key, plus a card:

``organ.json``: format, source (model ref, label, weight hash), ``layers`` (source block
indices), ``start``, ``size``, ``input_layer`` (the residual index the organ reads in its source:
``s`` for an extracted organ, ``0`` (the embeddings) once trained standalone), ``hidden_size``,
``architecture`` (T1's fields), ``signature`` and ``block_signature`` (T1), ``dtype``,
``training`` (None, or the standalone training configuration), ``metrics`` and
``tensors_sha256`` (names, dtypes, shapes and bytes of every tensor).

``organ.safetensors``: the tensors. No pickle anywhere. :func:`load_organ` re-reads both files and
refuses, in one line, a checkpoint whose tensors do not hash as the card says (edited or truncated
file), whose card disagrees with its tensors (hidden size, number of blocks) or that is not an
organ. :func:`check_fits` refuses, in one line, a recipient the organ cannot be put into.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..core.errors import GraftError
from ..core.jsonio import read_json_file
from ..core.outputs import share_like_new
from ..core.paths import check_writable_parent
from ..loading.arch import block_internal_signature, signature
from ..loading.bridged import block_of_width
from ..loading.models import LoadedModel
from ..loading.stream_forward import held, stream_fingerprint

ORGAN_FORMAT = "graft-organ/1"
_HEAD_NORM = re.compile(r"(^|\.)(q|k)_(norm|layernorm)\.")
ORGAN_CARD = "organ.json"
ORGAN_TENSORS = "organ.safetensors"


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Organ:
    """An organ in memory: its card and its tensors (``"<i>.<state_dict key>"``)."""

    card: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    path: Optional[Path] = None

    @property
    def size(self) -> int:
        return int(self.card["size"])

    @property
    def start(self) -> int:
        return int(self.card["start"])

    @property
    def input_layer(self) -> int:
        return int(self.card["input_layer"])

    @property
    def hidden_size(self) -> int:
        return int(self.card["hidden_size"])

    @property
    def source_ref(self) -> str:
        return str(self.card["source"]["ref"])

    @property
    def name(self) -> str:
        return (
            self.path.name
            if self.path
            else f"{self.card['source']['label']}[{self.start}:{self.start + self.size}]"
        )

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def block_state(self, i: int) -> dict[str, torch.Tensor]:
        prefix = f"{i}."
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def sha256(self) -> str:
        return tensors_sha256(self.tensors)


def default_start(n_layers: int) -> int:
    return n_layers // 3


def extract_organ(source: LoadedModel, start: Optional[int] = None, size: int = 3) -> Organ:
    """Copy blocks ``start .. start+size-1`` of ``source`` (CPU copies; the cached model is only read)."""
    L = source.arch.n_layers
    s = default_start(L) if start is None or start < 0 else int(start)
    if size < 1 or s + size > L:
        default = (
            f"; a negative start picks the default floor(L / 3) = {s}" if start is None or start < 0 else ""
        )
        raise GraftError(
            f"an organ of {size} blocks from block {s} does not fit in {source.label}'s {L} blocks "
            f"(start + size must be at most {L}{default})"
        )
    tensors: dict[str, torch.Tensor] = {}
    streamed = source.stream is not None
    for i in range(size):
        # a streamed source reads just this block (engine.loading.stream_forward.held)
        lock = held((source, source.stream.block_params(s + i))) if streamed else source.lock
        with lock:  # held() takes the model's lock itself
            for k, v in source.arch.blocks[s + i].state_dict().items():
                tensors[f"{i}.{k}"] = v.detach().to("cpu", copy=True).contiguous()
    desc = source.arch.describe()
    card = {
        "format": ORGAN_FORMAT,
        "source": {
            "ref": source.spec.ref,
            "label": source.label,
            # a streamed source's weights are not in memory to hash: its files identify it instead
            "weight_hash": None if streamed else source.state_hash(),
            **({"weight_files": stream_fingerprint(source)} if streamed else {}),
        },
        "layers": list(range(s, s + size)),
        "start": s,
        "size": size,
        "input_layer": s,
        "hidden_size": source.arch.hidden_size,
        "architecture": {k: v for k, v in desc.items() if k != "n_params"},
        "signature": signature(desc),
        "block_signature": block_internal_signature(desc),
        "dtype": str(source.dtype).replace("torch.", ""),
        "training": None,
        "metrics": {},
    }
    card["tensors_sha256"] = tensors_sha256(tensors)
    return Organ(card, tensors)


# --------------------------------------------------------------------------------------------
# Checkpoints


def save_organ(organ: Organ, out_dir: Union[str, Path]) -> Path:
    """Write ``organ.safetensors`` + ``organ.json``; replaces only an earlier organ checkpoint."""
    from safetensors.torch import save_file

    if not str(out_dir).strip():
        raise GraftError("no output folder given for the organ")
    out = Path(out_dir).expanduser().resolve()
    check_writable_parent(out)
    if out.is_dir() and any(out.iterdir()) and not (out / ORGAN_CARD).is_file():
        raise GraftError(
            f"refusing to write into {out}: the folder is not empty and is not an organ checkpoint (no "
            f"{ORGAN_CARD})"
        )
    card = dict(organ.card, tensors_sha256=organ.sha256())
    _check_consistent(Organ(card, organ.tensors), str(out))  # refuse before anything is written
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(card, indent=2, allow_nan=False)
    save_file(
        {k: v.contiguous() for k, v in organ.tensors.items()},
        str(out / ORGAN_TENSORS),
        metadata={"format": ORGAN_FORMAT},
    )
    (out / ORGAN_CARD).write_text(text)
    share_like_new(out / ORGAN_TENSORS)  # safetensors writes 0600
    organ.card, organ.path = card, out
    return out


def load_organ(path: Union[str, Path]) -> Organ:
    """Read an organ checkpoint back, bit-exactly; one-line GraftError for anything wrong with it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path is None or not str(path).strip():
        raise GraftError("no organ checkpoint given")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise GraftError(f"organ checkpoint {p} is not a folder")
    for f in (ORGAN_CARD, ORGAN_TENSORS):
        if not (p / f).is_file():
            raise GraftError(f"{p} is not an organ checkpoint: {f} is missing")
    card = read_json_file(p / ORGAN_CARD, f"organ checkpoint {p}: {ORGAN_CARD}")
    if not isinstance(card, dict) or card.get("format") != ORGAN_FORMAT:
        raise GraftError(f"organ checkpoint {p}: {ORGAN_CARD} is not a {ORGAN_FORMAT} card")
    try:
        tensors = load_file(str(p / ORGAN_TENSORS))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise GraftError(
            f"organ checkpoint {p}: cannot read {ORGAN_TENSORS} (truncated or not safetensors): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    organ = Organ(card, tensors, p.resolve())
    _check_consistent(organ, str(p))
    return organ


def _check_consistent(organ: Organ, where: str) -> None:
    card = organ.card
    try:
        size, hidden, layers = int(card["size"]), int(card["hidden_size"]), list(card["layers"])
        int(card["start"]), int(card["input_layer"]), str(card["source"]["ref"])
        arch = dict(card["architecture"])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise GraftError(
            f"organ checkpoint {where}: {ORGAN_CARD} lacks a field (size, start, layers, hidden_size, "
            "input_layer, source, architecture)"
        ) from None
    if organ.sha256() != card.get("tensors_sha256"):
        raise GraftError(
            f"organ checkpoint {where}: the tensors do not match the card's tensors_sha256 (edited or "
            "corrupted)"
        )
    ranks = {int(k.split(".", 1)[0]) for k in organ.tensors}
    if ranks != set(range(size)) or len(layers) != size:
        raise GraftError(
            f"organ checkpoint {where}: the card says {size} blocks, the tensors hold {len(ranks)}"
        )
    # The block's own norms are hidden-wide; per-head norms (Gemma 3's and Qwen 3's q_norm / k_norm,
    # Phi's optional q_layernorm / k_layernorm) are head_dim-wide and say nothing of the width.
    widths = {
        int(t.shape[0])
        for k, t in organ.tensors.items()
        if t.dim() == 1
        and k.endswith(".weight")
        and ("norm" in k.lower() or ".ln_" in k)
        and not _HEAD_NORM.search(k)
    }
    if widths and widths != {hidden}:
        raise GraftError(
            f"organ checkpoint {where}: the card says hidden size {hidden}, the tensors have {sorted(widths)}"
        )
    if arch.get("hidden_size") != hidden or block_internal_signature(arch) != card.get("block_signature"):
        raise GraftError(
            f"organ checkpoint {where}: the card's architecture fields disagree with its signature"
        )


def check_fits(
    organ: Organ, recipient: LoadedModel, position: Optional[int] = None, bridged: bool = False
) -> None:
    """One-line GraftError when ``organ`` cannot replace blocks of ``recipient`` (at ``position``).
    An organ of another hidden size fits only ``bridged``: the bridges map the recipient's width to
    the organ's and back (equal block internals still needed)."""
    desc = recipient.arch.describe()
    arch = organ.card["architecture"]
    if arch.get("family") != desc["family"]:
        raise GraftError(
            f"an organ and its recipient must be of the same family: the organ is {arch.get('family')} "
            f"({organ.card['source']['label']}), {recipient.label} is {desc['family']}"
        )
    if organ.card.get("block_signature") != block_internal_signature(desc):
        diff = [
            k
            for k in (
                "n_heads",
                "n_kv_heads",
                "head_dim",
                "intermediate_size",
                "norm_type",
                "activation",
                "positional",
            )
            if arch.get(k) != desc.get(k)
        ]
        raise GraftError(
            f"the organ's blocks do not fit {recipient.label}'s (block signature differs: "
            f"{', '.join(diff) or 'fields'})"
        )
    if organ.hidden_size != desc["hidden_size"] and not bridged:
        raise GraftError(
            f"the organ's hidden size {organ.hidden_size} differs from {recipient.label}'s "
            f"{desc['hidden_size']}: "
            f"insert it bridged (bridges map width {desc['hidden_size']} -> {organ.hidden_size} -> "
            f"{desc['hidden_size']})"
        )
    ref = template_block(organ, recipient, 0).state_dict()
    for i in range(organ.size):
        st = organ.block_state(i)
        if st.keys() != ref.keys() or any(tuple(st[k].shape) != tuple(ref[k].shape) for k in st):
            raise GraftError(f"the organ's block {i} does not have the tensors of {recipient.label}'s blocks")
    L = recipient.arch.n_layers
    if position is not None and not 0 <= position <= L - organ.size:
        raise GraftError(
            f"position {position} is out of range: an organ of {organ.size} blocks fits at "
            f"0..{L - organ.size} "
            f"in {recipient.label} ({L} blocks)"
        )


def set_layer_index(block: nn.Module, index: int) -> None:
    """Tell a block (and its attention) which layer it is, for the KV cache."""
    for m in block.modules():
        if hasattr(m, "layer_idx") and isinstance(getattr(m, "layer_idx"), int):
            m.layer_idx = index


def template_block(organ: Organ, recipient: LoadedModel, index: int) -> nn.Module:
    """A block shaped like the organ's, for block ``index`` of ``recipient``: the recipient's own block
    when the widths are equal, else a new one (:func:`block_of_width`)."""
    if organ.hidden_size == recipient.arch.hidden_size:
        return recipient.arch.blocks[index]
    return block_of_width(recipient.arch, organ.card["architecture"], index).to(
        recipient.device, recipient.dtype
    )


def build_blocks(
    organ: Organ, template: nn.Module, first_index: int, device: torch.device, dtype: torch.dtype
) -> list[nn.Module]:
    """New block modules holding the organ's tensors, shaped like ``template`` (a recipient block, or
    :func:`template_block`'s block of the organ's width).

    Each is a deep copy of the template (its own storage) loaded with the organ's tensors, cast to
    the recipient's dtype and device, with layer indices ``first_index + i``."""
    out = []
    with torch.inference_mode(False), torch.no_grad():
        for i in range(organ.size):
            block = copy.deepcopy(template).to(device=device, dtype=dtype)
            block.load_state_dict(
                {
                    k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                    for k, v in organ.block_state(i).items()
                },
                strict=True,
            )
            for prm in block.parameters():
                prm.requires_grad_(False)
            set_layer_index(block, first_index + i)
            block.eval()
            out.append(block)
    return out


def blocks_to_tensors(blocks: list[nn.Module]) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{k}": v.detach().to("cpu", copy=True).contiguous()
        for i, b in enumerate(blocks)
        for k, v in b.state_dict().items()
    }
