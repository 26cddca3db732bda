"""Read a PEFT LoRA adapter's factors (:func:`adapter_deltas`) as
:class:`engine.adapters.lowrank.ModuleDelta`.

The adapter folder is found and its config checked by :func:`engine.adapters.lora.resolve_adapter`; every
LoRA module becomes one delta ``dW = B @ A`` with the LoRA scale folded into ``B``.

Graft's choices (recorded in docs/methods.md)
--------------------------------------------------------
* **Scale**: ``lora_alpha / r`` or, with ``use_rslora``, ``lora_alpha / sqrt(r)`` (as PEFT's
  ``LoraLayer.update_layer``), with ``r`` and ``lora_alpha`` per module from ``rank_pattern`` and
  ``alpha_pattern`` matched the way PEFT does (``re.match(rf"(.*\\.)?({pattern})$", module_path)``).
* **Orientation**: PEFT always stores ``lora_A`` as ``(r, in_features)`` and ``lora_B`` as
  ``(out_features, r)``, also for GPT-2's ``Conv1D`` with ``fan_in_fan_out=True`` (checked
  against ``merge_and_unload``): ``fan_in_fan_out`` only says the *base* weight is stored
  ``(in, out)``, so PEFT merges ``(B @ A)^T`` into it. ``B @ A`` is therefore already the
  functional ``(out, in)`` delta and is used as is.
* **Module names**: the block index is the first all-digit component of the module path
  (``model.layers.3.self_attn.q_proj`` -> 3) and the rest is mapped to its canonical name with the
  family layouts of :mod:`engine.loading.arch` (``self_attn.q_proj`` -> ``attn.q``, ``attn.c_attn`` ->
  ``attn.qkv``, ``mlp.c_fc`` -> ``mlp.up`` ...). A path no layout knows keeps its in-block path
  as module name (``mlp.experts.0.w1``) with a kind guessed from its names, and is reported.
  LoRA outside the blocks (an ``lm_head`` or embedding adapter) is kept with ``layer = -1`` and
  ``kind = "other"``, and reported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..core.errors import GraftError
from ..loading.arch import LAYOUTS, kind_of
from ..loading.modelfiles import first_line
from .lora import ADAPTER_CONFIG, AdapterRef
from .lowrank import ModuleDelta

# In-block relative path -> canonical name, over every family layout of engine.loading.arch.
_CANONICAL: dict[str, str] = {}
for _layout in LAYOUTS.values():
    for _canon, _rel in _layout.linears.items():
        _CANONICAL.setdefault(_rel, _canon)

_KEY = re.compile(
    r"^(?P<path>.+?)\.lora_(?:(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight"
    r"|embedding_(?P<eab>A|B)(?:\.(?P<eadapter>[^.]+))?)$"
)


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", path)``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return patterns[key]
    return default


def _place(path: str) -> tuple[str, int, str]:
    """Module path -> (block container prefix, layer, in-block path); layer -1 outside blocks."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if i > 0 and part.isdigit():
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1 :])
    return "", -1, path


@dataclass
class AdapterReport:
    """What :func:`adapter_deltas` had to say about an adapter (unknown names, ignored tensors)."""

    warnings: list[str] = field(default_factory=list)
    unknown_modules: list[str] = field(default_factory=list)
    ignored_tensors: list[str] = field(default_factory=list)


def adapter_deltas(
    ref: AdapterRef, n_layers: Optional[int] = None, report: Optional[AdapterReport] = None
) -> list[ModuleDelta]:
    """Every LoRA module of the adapter as a :class:`ModuleDelta`, in block order.

    Keys of any PEFT layout are read (``base_model.model.<module path>.lora_A[.<adapter>].weight``
    and ``lora_B``; embedding LoRA ``lora_embedding_A/B``). Scale per module from ``lora_alpha``,
    ``r``, ``use_rslora``, ``rank_pattern`` and ``alpha_pattern`` (see the module docstring);
    factors are cast to float32 and the scale is folded into ``B``. With ``n_layers`` (the base
    model's), a block index beyond it is an error. What was unusual (unknown module names, LoRA
    outside the blocks, DoRA magnitudes, tensors that are not LoRA factors) goes to
    ``report.warnings``."""
    from safetensors import SafetensorError, safe_open

    report = report if report is not None else AdapterReport()
    cfg = ref.config
    where = ref.weights
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}

    pairs: dict[str, dict[str, Any]] = {}
    adapters: set[str] = set()
    try:
        with safe_open(str(where), framework="pt") as fh:
            keys = list(fh.keys())
            for key in keys:
                m = _KEY.match(key)
                if m is None:
                    report.ignored_tensors.append(key)
                    continue
                ab = m.group("ab") or m.group("eab")
                name = m.group("adapter") or m.group("eadapter")
                if name:
                    adapters.add(name)
                path = m.group("path")
                for pre in ("base_model.model.", "base_model."):
                    if path.startswith(pre):
                        path = path[len(pre) :]
                        break
                slot = pairs.setdefault(path, {"emb": m.group("eab") is not None, "key": key})
                t = fh.get_tensor(key)
                if t.dim() != 2:
                    raise GraftError(
                        f"{where} is not a LoRA adapter: tensor '{key}' has shape {list(t.shape)}, "
                        "not a matrix"
                    )
                if not t.is_floating_point():
                    raise GraftError(
                        f"{where}: tensor '{key}' is {str(t.dtype).replace('torch.', '')}, not floating point"
                    )
                slot[ab] = t.to(torch.float32)
    except GraftError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise GraftError(f"cannot read {where}: {first_line(exc)}") from None
    if len(adapters) > 1:
        raise GraftError(
            f"{where} holds several adapters ({', '.join(sorted(adapters))}): save one adapter per folder"
        )
    if not pairs:
        raise GraftError(f"{where} holds no LoRA factors (no lora_A / lora_B tensors)")

    # Which block container holds the layers: the most common prefix; other prefixes (a vision
    # tower, an encoder) are kept outside the grid so their indices cannot collide with it.
    prefixes: dict[str, int] = {}
    for path in pairs:
        pre, layer, _ = _place(path)
        if layer >= 0:
            prefixes[pre] = prefixes.get(pre, 0) + 1
    main = max(prefixes, key=lambda k: (prefixes[k], k)) if prefixes else None

    out: list[ModuleDelta] = []
    dora = bool(cfg.get("use_dora", False))
    for path in sorted(pairs):
        slot = pairs[path]
        if "A" not in slot or "B" not in slot:
            report.warnings.append(
                f"{path}: lora_{'A' if 'A' in slot else 'B'} without its partner; left out"
            )
            continue
        A, B = slot["A"], slot["B"]
        if slot["emb"]:
            # Embedding LoRA: lora_embedding_A is (r, vocab), lora_embedding_B (dim, r); PEFT adds
            # (B @ A)^T to the (vocab, dim) weight, so the (vocab, dim) delta is A^T @ B^T.
            A, B = slot["B"].T.contiguous(), slot["A"].T.contiguous()
        if A.shape[0] != B.shape[1]:
            raise GraftError(
                f"{where} is corrupt: module {path} has lora_A {list(slot['A'].shape)} and "
                f"lora_B {list(slot['B'].shape)}, whose ranks differ"
            )
        r = int(A.shape[0])
        r_cfg = int(_pattern_value(rank_pattern, path, r_default))
        if r_cfg != r:
            raise GraftError(
                f"{where} does not match its {ADAPTER_CONFIG}: module {path} has rank {r} but the config "
                f"says {r_cfg}"
            )
        alpha = float(_pattern_value(alpha_pattern, path, alpha_default))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise GraftError(
                f"{where}: module {path} has non-finite values (NaN or infinity) in its LoRA factors"
            )
        scaled = (B * scale).contiguous()
        if not bool(torch.isfinite(scaled).all()):
            raise GraftError(
                f"{where}: module {path}'s scale lora_alpha / {'sqrt(r)' if rslora else 'r'} = {scale:.3g} "
                f"takes its lora_B past the {str(B.dtype).replace('torch.', '')} range (see "
                f"{ADAPTER_CONFIG})"
            )
        pre, layer, rel = _place(path)
        if layer >= 0 and pre == main:
            canonical = _CANONICAL.get(rel)
            known = canonical is not None
            module = canonical or rel
            kind = kind_of(module)
            name = f"blocks.{layer}.{module}"
            if not known:
                report.unknown_modules.append(path)
            if n_layers is not None and layer >= n_layers:
                raise GraftError(
                    f"adapter module {path} is in block {layer}, but the base model has {n_layers} blocks: "
                    "is this adapter for another model?"
                )
        else:
            layer, module, kind, name, known = -1, path, "other", path, False
            report.unknown_modules.append(path)
        out.append(
            ModuleDelta(
                name=name,
                layer=layer,
                module=module,
                kind=kind,
                B=scaled,
                A=A.contiguous(),
                source=path,
                known=known,
                scale=scale,
            )
        )
    if not out:
        raise GraftError(f"{where} holds no complete LoRA module (lora_A with its lora_B)")
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise GraftError(f"{where}: several LoRA modules map to the same name ({', '.join(dup[:3])})")
    inside = [d for d in out if d.layer >= 0 and not d.known]
    outside = [d for d in out if d.layer < 0]
    if inside:
        report.warnings.append(
            f"{len(inside)} module(s) have names no Graft layout knows and keep their own "
            f"({', '.join(sorted({d.module for d in inside})[:4])}); their kind is guessed from the name"
        )
    if outside:
        report.warnings.append(
            f"{len(outside)} LoRA module(s) lie outside the transformer blocks "
            f"({', '.join(d.name for d in outside[:3])}"
            f"{' ...' if len(outside) > 3 else ''}); they are listed with layer -1 and kind 'other'"
        )
    if report.ignored_tensors:
        shown = ", ".join(report.ignored_tensors[:3])
        report.warnings.append(
            f"{len(report.ignored_tensors)} tensor(s) that are not LoRA factors were ignored "
            f"({shown}{' ...' if len(report.ignored_tensors) > 3 else ''}), e.g. modules_to_save "
            "or DoRA magnitudes"
        )
    if dora:
        report.warnings.append(
            "DoRA adapter (use_dora): its magnitude vectors rescale the merged weight and are not "
            "part of the low-rank update; the cells show the direction update scale * B @ A only"
        )
    order = {canon: i for i, canon in enumerate(MODULE_ORDER)}
    out.sort(key=lambda d: (d.layer < 0, d.layer, order.get(d.module, len(order)), d.module))
    return out


MODULE_ORDER = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def check_against_model(deltas: list[ModuleDelta], model: Any) -> list[str]:
    """Check adapter deltas against a loaded base model (``LoadedModel``): every canonical module
    must exist there with the delta's ``(out, in)`` shape. Returns warnings (modules the base does
    not have under that name); a shape mismatch, or an adapter none of whose modules the base has
    (one trained on another architecture), is a :class:`GraftError`."""
    mods = {m.name: m for m in model.arch.linear_modules()}
    if deltas and not any(d.name in mods for d in deltas):
        names = ", ".join(d.name for d in deltas[:3])
        raise GraftError(
            f"none of the adapter's {len(deltas)} module(s) exists in the base model {model.label} "
            f"(e.g. {names}): was it trained on another architecture?"
        )
    missing = []
    for d in deltas:
        lm = mods.get(d.name)
        if lm is None:
            if d.known:
                missing.append(d.name)
            continue
        if tuple(lm.shape) != d.shape:
            raise GraftError(
                f"the adapter does not fit the base model {model.label}: {d.name} is "
                f"{d.shape[0]}x{d.shape[1]} "
                f"(out x in) in the adapter but {lm.shape[0]}x{lm.shape[1]} in the model"
            )
    if missing:
        return [f"{len(missing)} adapter module(s) do not exist in {model.label} ({', '.join(missing[:3])})"]
    return []
