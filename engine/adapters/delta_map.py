"""What concept cartography (T5) and the spectrum (T6) share: the weight update as low-rank factors
from an adapter or a full fine-tune (:func:`load_deltas`), the module filter, per-cell statistics
and the layer x module grid."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..core.errors import GraftError
from ..core.params import list_items
from ..core.progress import Progress
from ..loading.arch import kind_of
from .finetune_delta import finetune_deltas
from .lora import resolve_adapter
from .lora_factors import MODULE_ORDER, AdapterReport, adapter_deltas, check_against_model
from .lowrank import ModuleDelta, factored_svd

NEEDS = (
    ("adapter",),
    ("adapter", "base"),
    ("donor", "base"),
)  # adapter + base: shapes checked against the base


@dataclass
class DeltaSource:
    deltas: list[ModuleDelta]
    source: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    truncated: bool = False  # factors are a truncated SVD (full fine-tune)


def model_label(model: Any) -> str:
    spec = getattr(model, "spec", None)
    return str(getattr(spec, "ref", None) or getattr(model, "label", "") or "model")


def load_deltas(
    ctx: Any, rank: int, seed: int, progress: Progress, select: Optional[Callable[[str], bool]] = None
) -> DeltaSource:
    """The deltas of the run's input: ``ctx.adapter`` (with ``ctx.base`` optional, to check
    shapes), else ``ctx.donor`` with ``ctx.base`` (full fine-tune). ``select(name)`` limits
    the modules (applied before any SVD of a full fine-tune)."""
    adapter = getattr(ctx, "adapter", None)
    base = getattr(ctx, "base", None)
    donor = getattr(ctx, "donor", None)
    if adapter:
        progress(0.05, "reading adapter")
        ref = resolve_adapter(str(adapter))
        report = AdapterReport()
        n_layers = base.arch.n_layers if base is not None else None
        deltas = adapter_deltas(ref, n_layers=n_layers, report=report)
        warnings = list(report.warnings)
        if base is not None:
            warnings += check_against_model(deltas, base)
        if select is not None:
            deltas = [d for d in deltas if select(d.name)]
        c = ref.config
        source = {
            "kind": "adapter",
            "adapter": ref.describe(),
            "base": model_label(base) if base is not None else (ref.base_hint or None),
            "base_checked": base is not None,
            "donor_card": bool(ref.card),
            "scale_rule": "lora_alpha / sqrt(r) (rsLoRA)" if c.get("use_rslora") else "lora_alpha / r",
            "label": ref.label or str(ref.path),
        }
        progress(0.3, f"{len(deltas)} LoRA modules read")
        return DeltaSource(deltas, source, warnings, truncated=False)
    if donor is not None and base is not None:
        progress(0.02, "forming W_D - W_T per module")
        deltas = finetune_deltas(donor, base, rank, progress.sub(0.02, 0.8), seed=seed, select=select)
        source = {
            "kind": "finetune",
            "donor": model_label(donor),
            "base": model_label(base),
            "rank": rank,
            "seed": seed,
            "method": "truncated randomized SVD (Halko et al. 2011, subspace iteration: oversampling 8, "
            "4 power iterations, float64) of W_D - W_T; exact ||dW||_F",
            "label": f"{model_label(donor)} - {model_label(base)}",
        }
        warnings = []
        if (
            str(getattr(donor, "dtype", "")) != "torch.float32"
            or str(getattr(base, "dtype", "")) != "torch.float32"
        ):
            warnings.append(
                "the models were loaded in reduced precision: W_D - W_T carries rounding noise of that dtype"
            )
        return DeltaSource(deltas, source, warnings, truncated=True)
    raise GraftError(
        "this tool needs --adapter (a LoRA folder, a make-donor folder or the demo donor's name), "
        "or --donor with its --base (a full fine-tune)"
    )


def module_filter(text: str) -> Optional[Callable[[str], bool]]:
    """A predicate over module names from a comma list: exact names (``blocks.3.attn.q``),
    module names (``attn.q``: every layer), kinds (``attention``, ``mlp``), layers (``layer:3``)
    or globs (``blocks.1*.mlp.*``). None for an empty list."""
    items = list_items(text, "--modules", "every module")
    if not items:
        return None

    def parts(name: str) -> tuple[Optional[int], str]:
        if name.startswith("blocks."):
            _, layer, rest = (name.split(".", 2) + ["", ""])[:3]
            if layer.isdigit():
                return int(layer), rest
        return None, name

    def one(item: str) -> Callable[[str], bool]:
        low = item.lower()
        if low in ("attention", "mlp", "other"):
            return lambda n: kind_of(parts(n)[1]) == low if parts(n)[0] is not None else low == "other"
        if low.startswith("layer:") and low[6:].strip().isdigit():
            k = int(low[6:])
            return lambda n: parts(n)[0] == k
        if any(ch in item for ch in "*?["):
            return lambda n: fnmatch.fnmatchcase(n, item)
        return lambda n: n == item or parts(n)[1] == item

    preds = [(item, one(item)) for item in items]

    def select(name: str) -> bool:
        hit = False
        for item, p in preds:
            if p(name):
                select.used.add(item)  # type: ignore[attr-defined]
                hit = True
        return hit

    select.used = set()  # type: ignore[attr-defined]
    select.items = items  # type: ignore[attr-defined]
    return select


def check_filter_used(select: Optional[Callable[[str], bool]], names: list[str]) -> None:
    if select is None:
        return
    unused = [i for i in select.items if i not in select.used]  # type: ignore[attr-defined]
    if unused:
        example = ", ".join(names[:3])
        raise GraftError(
            f"--modules: {', '.join(unused)} matches no module (names look like {example}; "
            "module names such as attn.q, kinds attention / mlp, layer:3, or globs also work)"
        )


@dataclass
class CellStats:
    delta: ModuleDelta
    S: torch.Tensor  # float64, descending
    norm_sq: float  # exact ||dW||_F^2
    captured: Optional[float]  # sum S^2 / norm_sq


def cell_stats(deltas: list[ModuleDelta], progress: Progress) -> list[CellStats]:
    out = []
    for i, d in enumerate(deltas):
        _, S, _ = factored_svd(d.B, d.A)
        known = float((S * S).sum())
        total = d.norm_sq() if d.frob_norm is not None else known
        captured = min(1.0, known / total) if total > 0 else None
        out.append(CellStats(d, S, total, captured))
        if i % 16 == 0 or i == len(deltas) - 1:
            progress((i + 1) / max(1, len(deltas)), f"spectrum {i + 1}/{len(deltas)}")
    return out


def grid_axes(deltas: list[ModuleDelta]) -> tuple[list[int], list[str]]:
    """Rows (block layers present) and columns (module names, canonical order first)."""
    layers = sorted({d.layer for d in deltas if d.layer >= 0})
    order = {m: i for i, m in enumerate(MODULE_ORDER)}
    modules = sorted({d.module for d in deltas if d.layer >= 0}, key=lambda m: (order.get(m, len(order)), m))
    return layers, modules


# =============================================================================================
# T5
# =============================================================================================
