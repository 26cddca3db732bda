"""``go-no-go`` (issue 9, part 3): a pre-surgery recommendation per transplant operation.

Runs T1-T4 on the pair through the run's own :class:`~engine.running.context.ToolContext` (so T2-T4 share
one activation capture and one CKA matrix, exactly as when they run one by one), T7 where a module
swap is possible, and T5/T6 when an adapter is given; then :mod:`engine.evaluation.gonogo` turns their numbers
into one line per operation (module swap, organ transplant, rank-k conjugation) with the settings
to use (K, positions, rank k, maps) and the evidence behind each, or a no-go with the reason.
The tools' own compute functions are called; nothing is re-implemented here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ..core.errors import GraftError
from ..core.params import param
from ..core.progress import Progress
from ..evaluation import gonogo
from ..running.context import ToolContext
from ..running.module_choice import rank_modules
from ..running.registry import Tool, register
from .bridge import BridgeParams, compute_bridge
from .cartography import CartographyParams, compute_cartography
from .cka import CKAParams, compute_cka
from .compat import CompatParams, compute_compat
from .procrustes import ProcrustesParams, compute_procrustes
from .spectrum import SpectrumParams, compute_spectrum


@dataclass(frozen=True)
class GoNoGoParams:
    adapter: str = param(
        "",
        "Optional LoRA adapter of the concept (a PEFT folder, a make-donor folder or the demo donor's "
        "name): adds T5/T6, so the conjugation line gets its rank k. Empty = no adapter.",
    )
    identity_max: float = param(
        0.5,
        "Same coordinates (needed by a module swap and by a plain merge): the median T3 held-out "
        "residual of the identity map over matched layers must stay at or below this.",
        min=0.0,
        max=10.0,
    )
    swap_mass: float = param(
        0.8,
        "Suggested K = the smallest number of top T7 modules holding this share of the total "
        "activation-difference score.",
        min=0.01,
        max=1.0,
    )
    epsilon_direct: float = param(
        0.1,
        "T4: direct organ replacement is plausible where epsilon = 1 - cosine (raw) is below this.",
        min=0.0,
        max=2.0,
    )
    epsilon_bridged: float = param(
        0.2,
        "T4: bridged organ insertion is plausible where the bridged epsilon is below this.",
        min=0.0,
        max=2.0,
    )
    min_map_alignment: float = param(
        0.9,
        "Conjugation is viable when the best linear map per matched layer (identity, "
        "Procrustes or ridge; T3) explains at least this share of the target's held-out "
        "activations on average (the demo adapter did not carry into Gemma-3 at about "
        "0.8; it carried fully into a rotated twin at 0.97).",
        min=0.0,
        max=1.0,
    )
    rank_energy: float = param(
        0.9,
        "With an adapter: rank k = the smallest rank keeping this share of each module's update energy (T6).",
        min=1e-6,
        max=1.0,
    )
    positions: int = param(
        3, "How many organ insertion positions to suggest (smallest epsilon first).", min=1, max=100
    )


@dataclass
class GoNoGoResult:
    operations: list[
        dict[str, Any]
    ]  # per operation: operation, title, go, verdict, settings, reasons, evidence
    viable: list[str]  # operations that are go, in the order above
    recommendation: str  # one line: "go: ..." or "no-go: ..."
    checks: dict[str, Any]  # the headline numbers of every tool that ran
    tools_run: list[str]  # codes: T1, T2, T3, T4 (+ T7, T5, T6)
    thresholds: dict[str, Any]
    warnings: list[str]


def _asdict(result: Any) -> dict[str, Any]:
    return dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)


def compute_gonogo(ctx: ToolContext, params: GoNoGoParams, progress: Progress) -> GoNoGoResult:
    th = gonogo.Thresholds(
        identity_max=params.identity_max,
        swap_mass=params.swap_mass,
        epsilon_direct=params.epsilon_direct,
        epsilon_bridged=params.epsilon_bridged,
        min_map_alignment=params.min_map_alignment,
        rank_energy=params.rank_energy,
        positions=params.positions,
    )
    adapter_ctx = None
    if params.adapter.strip():
        from ..adapters.lora import resolve_adapter

        resolve_adapter(params.adapter)  # a bad adapter is one line before any capture
        adapter_ctx = dataclasses.replace(ctx, adapter=params.adapter.strip(), base=None)
    progress(0.0, "T1 compatibility")
    compat = _asdict(compute_compat(ctx, CompatParams(), progress.sub(0.0, 0.05)))
    cka = _asdict(compute_cka(ctx, CKAParams(), progress.sub(0.05, 0.4)))
    progress(0.4, "T3 Procrustes residuals")
    proc = _asdict(compute_procrustes(ctx, ProcrustesParams(), progress.sub(0.4, 0.55)))
    progress(0.55, "T4 bridge sufficiency")
    bridge = _asdict(
        compute_bridge(ctx, BridgeParams(epsilon_threshold=params.epsilon_direct), progress.sub(0.55, 0.7))
    )
    tools_run = ["T1", "T2", "T3", "T4"]
    rank: Optional[dict[str, Any]] = None
    rank_error = ""
    if compat["verdicts"]["module_swap"]:
        progress(0.7, "T7 module ranking")
        try:
            rank = _asdict(rank_modules(ctx, progress.sub(0.7, 0.85)))
            tools_run.append("T7")
        except GraftError as exc:
            rank_error = str(exc)
    spectrum = carto = None
    if adapter_ctx is not None:
        progress(0.85, "T5 / T6 from the adapter")
        carto = _asdict(compute_cartography(adapter_ctx, CartographyParams(), progress.sub(0.85, 0.9)))
        spectrum = _asdict(
            compute_spectrum(
                adapter_ctx, SpectrumParams(threshold=params.rank_energy), progress.sub(0.9, 0.97)
            )
        )
        tools_run += ["T5", "T6"]
    progress(0.98, "recommendation")
    coords = gonogo.coordinates(proc)
    ops = [
        gonogo.module_swap(compat, coords, rank, rank_error, th),
        gonogo.organ(compat, bridge, th),
        gonogo.conjugation(compat, cka, proc, coords, spectrum, carto, th),
    ]
    viable, line = gonogo.overall(ops)
    checks = {
        "verdicts_t1": compat["verdicts"],
        "tokenizer_overlap": compat["tokenizer_overlap"],
        "mean_matched_cka": cka["mean_matched_cka"],
        "matching": cka["matching"],
        "mean_alignment_t3": proc["mean_alignment"],
        "median_residual": coords,
        "min_epsilon_raw": None
        if bridge["epsilon_raw"] is None
        else min(min(r) for r in bridge["epsilon_raw"]),
        "min_epsilon_bridged": min(min(r) for r in bridge["epsilon_bridged"]),
        "alignment": cka["alignment"],
        "n_rows": cka["n_rows"],
        "t7_modules": rank["n_modules"] if rank else None,
        "t6_summary": {k: spectrum["summary"].get(k) for k in ("median_k", "max_k", "median_k_by_kind")}
        if spectrum
        else None,
    }
    warnings = list(proc.get("warnings") or []) + list((spectrum or {}).get("warnings") or [])
    progress(1.0, "done")
    return GoNoGoResult(
        operations=ops,
        viable=viable,
        recommendation=line,
        checks=checks,
        tools_run=tools_run,
        thresholds=dataclasses.asdict(th),
        warnings=warnings,
    )


TOOL = register(
    Tool(
        name="go-no-go",
        code="OP0",
        title="Pre-surgery go / no-go",
        summary="Runs T1-T4 (T7 where a swap is possible, T5/T6 with an adapter) and recommends, per "
        "operation, whether it "
        "is viable and with which settings (K, organ positions, rank k and maps), with the evidence behind "
        "each line.",
        params_cls=GoNoGoParams,
        compute=compute_gonogo,
        figure="viz.gonogo:gonogo_figure",
        page="Go / no-go",
        run_label="Run go / no-go",
    )
)
