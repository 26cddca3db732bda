"""Models placed across devices by accelerate (docs/methods.md, "Streaming and the memory plan").

The *dispatch* route loads a model folder with transformers' ``device_map="auto"`` and a
``max_memory`` map from the run's memory plan: accelerate fills the GPU first, then the CPU, and
leaves what does not fit on disk, read back from the folder's own safetensors shards (nothing is
copied). Offloaded modules are moved onto the execution device by accelerate's hooks when they run
and dropped after, so a forward pass behaves as on a model held whole. On a machine without a GPU
the same route places the model across the CPU and disk.

Only activation tools run on this route: an offloaded module's parameters sit on the meta device
behind the hooks, so a tool that reads or edits weights would see no values. The memory plan gives
those tools the streamed route instead (:mod:`engine.loading.stream`).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from ..core.errors import GraftError
from ..core.paths import graft_home

TIERS = ("device", "cpu", "disk")


def accelerate_map(max_memory: dict[str, int]) -> dict[Any, int]:
    """The plan's per-model map (``{"cuda:0": bytes, "cpu": bytes}``) in accelerate's keys (``0``)."""
    out: dict[Any, int] = {}
    for k, v in max_memory.items():
        key: Any = int(k.split(":", 1)[1]) if k.startswith("cuda:") else k
        if key != "cpu" and not isinstance(key, int):
            raise GraftError(f"internal: cannot place a model on {k!r}")
        if isinstance(key, int) and key >= torch.cuda.device_count():
            raise GraftError(f"the memory plan places a model on {k}, and this machine has no such GPU")
        out[key] = max(0, int(v))
    return out


def main_device(device_map: dict[str, Any]) -> torch.device:
    """Where the model runs: the first GPU it was placed on, else the CPU (offloaded modules run there)."""
    gpus = sorted(
        {v for v in device_map.values() if isinstance(v, int) or str(v).startswith("cuda")}, key=str
    )
    if gpus:
        g = gpus[0]
        return torch.device(f"cuda:{g}" if isinstance(g, int) else str(g))
    return torch.device("cpu")


def tier_of(where: Any) -> str:
    if where == "disk":
        return "disk"
    if where in ("cpu", "meta"):
        return "cpu"
    return "device"


def placement_summary(model: Any, dtype: torch.dtype) -> dict[str, Any]:
    """What accelerate placed where: the device map, and bytes (in the run's dtype) per tier."""
    device_map = dict(getattr(model, "hf_device_map", None) or {"": "cpu"})
    size = torch.empty(0, dtype=dtype).element_size()
    tiers = dict.fromkeys(TIERS, 0)
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        best = max(
            (k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=""
        )
        tiers[tier_of(device_map.get(best, "cpu"))] += p.numel() * size
    return {
        "device_map": {k: str(v) for k, v in device_map.items()},
        "bytes": tiers,
        "blocks_offloaded": sum(1 for v in device_map.values() if tier_of(v) != "device"),
    }


def load_dispatched(
    folder: Path,
    dtype: torch.dtype,
    max_memory: dict[str, int],
    *,
    label: str,
    where: str,
    trust_remote_code: bool,
) -> tuple[Any, Any, torch.device, dict[str, Any]]:
    """``(model, tokenizer, main device, placement)`` of ``folder`` placed by accelerate within
    ``max_memory``. Anything transformers has to write to disk goes to a temporary folder of Graft's
    that is removed when the model is (or when the process ends)."""
    from .hf_folder import read_model_folder

    scratch = graft_home() / "offload"
    scratch.mkdir(parents=True, exist_ok=True)
    offload = Path(tempfile.mkdtemp(prefix="dispatch-", dir=scratch))
    try:
        model, tok = read_model_folder(
            folder,
            dtype,
            label=label,
            where=where,
            trust_remote_code=trust_remote_code,
            model_kw={
                "device_map": "auto",
                "max_memory": accelerate_map(max_memory),
                "offload_folder": str(offload),
            },
        )
    except BaseException:
        shutil.rmtree(offload, ignore_errors=True)
        raise
    if not any(offload.iterdir()):
        shutil.rmtree(offload, ignore_errors=True)
    else:  # transformers wrote weights it could not serve from the shards: they go with the model
        weakref.finalize(model, shutil.rmtree, str(offload), True)
    if getattr(model, "hf_device_map", None) is None:  # transformers sets none when one device takes all
        model.hf_device_map = {"": str(next(model.parameters()).device)}
    return model, tok, main_device(dict(model.hf_device_map)), placement_summary(model, dtype)


def load_dispatched_model(spec: Any, folder: Path, dtype: torch.dtype, max_memory: dict[str, int]) -> Any:
    """A :class:`~engine.loading.models.LoadedModel` placed across the GPU, the CPU and disk."""
    from .bridged import BRIDGES_FILE
    from .models import LoadedModel, check_vocab

    if (folder / BRIDGES_FILE).is_file():
        raise GraftError(
            f"{spec.label} is a bridged organ transplant: its bridges run between blocks, so it is held "
            "whole (--stream off)"
        )
    where = str(folder) if spec.kind in ("path", "hub") else spec.label
    model, tok, dev, placement = load_dispatched(
        folder, dtype, max_memory, label=spec.label, where=where, trust_remote_code=spec.trust_remote_code
    )
    check_vocab(spec, model, tok)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    from .arch import ArchAdapter

    return LoadedModel(spec, model, tok, ArchAdapter(model), dev, dtype, str(folder), placement=placement)


def offload_leftovers() -> list[str]:
    """Graft's offload folders still on disk (each belongs to a model still loaded somewhere)."""
    root = graft_home() / "offload"
    return sorted(str(p) for p in root.iterdir()) if root.is_dir() else []
