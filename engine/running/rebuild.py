"""T' back from a finished transplant run: the models of the run, the edit re-applied, the hashes checked.

A transplant run (module swap, rank-k conjugation, and any operation that registers a rebuilder)
records its inputs, parameters and the weight hashes of T and T'. :func:`rebuild_transplant`
loads the same models, re-applies the same edit to a working copy of the target (the cached
target is never written) and refuses, in one line, when T no longer hashes as it did in the run
(a folder whose files changed) or when the re-applied edit does not reproduce the run's T'.

Each operation has one rebuilder, registered under its tool name with :func:`register_rebuilder`;
a rebuilder takes ``(envelope, store, device)`` and returns a :class:`Rebuilt` whose ``edit``
follows the protocol of :class:`engine.surgery.transplant.ModuleSwap`: ``working``, ``apply()``,
``rollback()``, ``weight_hash()``, ``hash_before()``, ``verify_rollback()``.

:func:`transplant_for` is what a diagnostic of a transplant (T12, T13) calls: T' of ``--run``
from the history, or a module swap run on the spot on ``--donor``/``--target`` with swap's
own module choice (top-K of T7, or named modules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

from torch import nn

from ..core.errors import GraftError
from ..core.params import param
from ..core.progress import Progress, silent
from ..loading.models import LoadedModel, ModelSpec, ModelStore


@dataclass(frozen=True)
class TransplantChoice:
    """The parameters of a diagnostic that runs its own module swap when given --donor/--target
    (ignored with --run): the same choice as T11 swap."""

    k: int = param(
        8,
        "With --donor/--target: swap the top-K modules of the T7 ranking (ignored with --run or --modules).",
        min=1,
        max=100_000,
    )
    modules: str = param(
        "",
        "With --donor/--target: comma-separated module names to swap instead of the top K, "
        "e.g. 'blocks.3.attn.o,blocks.5.mlp.down' (ignored with --run).",
    )


class DModel(NamedTuple):
    """The donor side D of a transplant: a model with its own tokenizer (a donor, or an adapter
    merged into a working copy of its base)."""

    model: nn.Module
    tokenizer: Any
    label: str
    lock: Any = None  # the cached model's lock when D is a shared LoadedModel (hold it to hook or evaluate D)


def as_dmodel(m: LoadedModel) -> DModel:
    return DModel(m.model, m.tokenizer, m.label, m.lock)


class Rebuilt(NamedTuple):
    target: LoadedModel  # T (cached, shared: evaluate it under target.lock)
    working: nn.Module  # T' (a working copy sharing every untouched tensor with T)
    donor: Optional[DModel]  # D, or None when the operation has none
    undo: Callable[[], int]  # roll T' back to T, bit-exactly (returns the tensors restored)
    edit: Any = None  # the reversible edit (ModuleSwap, Conjugation, ...), applied
    source: Optional[dict[str, Any]] = None  # what was rebuilt: run id, tool, operation, modules, hashes


Rebuilder = Callable[[dict[str, Any], ModelStore, Optional[str]], Rebuilt]
_REBUILDERS: dict[str, Rebuilder] = {}


def register_rebuilder(tool_name: str, fn: Rebuilder) -> Rebuilder:
    """Register how runs of ``tool_name`` are rebuilt; refuses a second rebuilder for one tool."""
    if tool_name in _REBUILDERS:
        raise ValueError(f"a rebuilder for {tool_name} is already registered")
    _REBUILDERS[tool_name] = fn
    return fn


def rebuildable_tools() -> tuple[str, ...]:
    return tuple(sorted(_REBUILDERS))


def load_run(run_id: str, history: Any = None) -> dict[str, Any]:
    """The result envelope of a finished run in the history (one line when there is none)."""
    from .history import History

    run_id = str(run_id or "").strip()
    if not run_id:
        raise GraftError("no run id given")
    row = (history or History()).get(run_id)
    if row is None:
        raise GraftError(f"no run {run_id} in the run history (the Runs page lists them)")
    if row["status"] != "done" or not row.get("result"):
        raise GraftError(
            f"run {run_id} is {row['status']}, not finished: only a finished transplant run can be rebuilt"
        )
    env = dict(row["result"])
    env.setdefault("run_id", run_id)
    return env


def rebuild_transplant(envelope: dict[str, Any], store: ModelStore, device: Optional[str] = None) -> Rebuilt:
    """Re-apply a finished transplant run's edit to the same models (module docstring).
    ``device`` defaults to the run's own; the dtype is always the run's (the hashes depend on it)."""
    tool = envelope.get("tool")
    known = rebuildable_tools()
    if tool not in _REBUILDERS:
        raise GraftError(
            f"only a finished transplant run can be rebuilt (module-swap, conjugation or another "
            f"registered operation: {', '.join(known)}); this is a {tool} run"
        )
    return _REBUILDERS[tool](envelope, store, device)


def _options(envelope: dict[str, Any], device: Optional[str]) -> tuple[str, str]:
    opts = (envelope.get("meta") or {}).get("options") or {}
    return device or opts.get("device", "auto"), opts.get("dtype", "float32")


def _load(
    envelope: dict[str, Any], key: str, store: ModelStore, device: str, dtype: str, trust: bool
) -> LoadedModel:
    return store.get(ModelSpec.parse(envelope[key], trust_remote_code=trust), device, dtype)


def _check(edit: Any, target: LoadedModel, before: Optional[str], after: Optional[str], what: str) -> None:
    """Refuse a T whose hash changed; apply; refuse (rolled back) a T' that is not the run's."""
    if before and edit.hash_before() != before:
        raise GraftError(
            f"the target {target.label} has changed since this run (weight hash differs); run the {what} "
            "again"
        )
    edit.apply()
    if after and edit.weight_hash() != after:
        edit.rollback()
        raise GraftError(
            f"re-applying the run's {what} does not reproduce its T' (weight hash differs: "
            "did the donor, the adapter or the workload change?)"
        )


def _source(envelope: dict[str, Any], operation: str, modules: list[str], edit: Any) -> dict[str, Any]:
    return {
        "kind": "run",
        "run_id": envelope.get("run_id"),
        "tool": envelope.get("tool"),
        "operation": operation,
        "donor": envelope.get("donor") or envelope.get("adapter"),
        "target": envelope.get("target"),
        "modules": list(modules),
        "weight_hash_before": edit.hash_before(),
        "weight_hash_after": edit.weight_hash(),
    }


def rebuild_swap(envelope: dict[str, Any], store: ModelStore, device: Optional[str] = None) -> Rebuilt:
    """A module-swap run: the recorded modules copied again from the same donor."""
    from ..surgery.transplant import ModuleSwap

    result = envelope.get("result") or {}
    card = result.get("card") or {}
    modules = [m["name"] for m in result.get("modules") or []]
    if not modules:
        raise GraftError("this swap run records no modules to swap")
    dev, dtype = _options(envelope, device)
    trust = bool(card.get("trust_remote_code", False))
    donor = _load(envelope, "donor", store, dev, dtype, trust)
    target = _load(envelope, "target", store, dev, dtype, trust)
    swap = ModuleSwap(target, donor, modules)
    _check(swap, target, result.get("weight_hash_before"), result.get("weight_hash_after"), "swap")
    return Rebuilt(
        target,
        swap.working,
        as_dmodel(donor),
        swap.rollback,
        swap,
        _source(envelope, "module-swap", list(swap.modules), swap),
    )


def rebuild_conjugation(envelope: dict[str, Any], store: ModelStore, device: Optional[str] = None) -> Rebuilt:
    """A conjugation run: the same update read again and every map fitted again on the run's
    workload (checked by its sha256), then the update added to a working copy of the target."""
    from ..core.data import resolve_workload
    from ..core.params import RunOptions, build_params
    from ..surgery.conjugate import Conjugation
    from .conjugation import conjugation_plan, merged_donor, update_deltas
    from .context import ToolContext
    from .registry import get_tool

    result = envelope.get("result") or {}
    meta = envelope.get("meta") or {}
    card = result.get("card") or {}
    dev, dtype = _options(envelope, device)
    options = build_params(RunOptions, {**(meta.get("options") or {}), "device": dev})
    params = build_params(get_tool("conjugate").params_cls, {**(meta.get("params") or {}), "save": ""})
    workload = resolve_workload(options.workload)
    recorded = (meta.get("workload") or {}).get("sha256")
    if recorded and workload.sha256 != recorded:
        raise GraftError(
            f"the workload {workload.name} has changed since this run (sha256 differs); run the "
            "conjugation again"
        )
    trust = bool(card.get("trust_remote_code", False))
    base = _load(envelope, "base", store, dev, dtype, trust)
    target = _load(envelope, "target", store, dev, dtype, trust)
    donor = _load(envelope, "donor", store, dev, dtype, trust) if envelope.get("donor") else None
    ctx = ToolContext(
        donor, target, workload, options, base=base, adapter=envelope.get("adapter"), store=store
    )
    deltas, _, _ = update_deltas(ctx, params, silent())
    conj = Conjugation(target, conjugation_plan(ctx, params, deltas, silent()))
    _check(conj, target, result.get("weight_hash_before"), result.get("weight_hash_after"), "conjugation")
    d = (
        as_dmodel(donor)
        if donor is not None
        else DModel(merged_donor(base, deltas), base.tokenizer, f"{envelope.get('adapter')} on {base.label}")
    )
    return Rebuilt(
        target,
        conj.working,
        d,
        conj.rollback,
        conj,
        _source(envelope, "rank-k conjugation", list(conj.modules), conj),
    )


register_rebuilder("swap", rebuild_swap)
register_rebuilder("conjugate", rebuild_conjugation)


def transplant_for(ctx: Any, k: int, modules: str, progress: Optional[Progress] = None) -> Rebuilt:
    """T' for a diagnostic: the run ``ctx.run`` rebuilt from the history (on ``ctx.options.device``),
    or a module swap of ``ctx.donor`` into ``ctx.target`` chosen as swap chooses (``modules`` by
    name, else the top ``k`` of T7). The caller must call ``undo()`` when done."""
    from ..surgery.transplant import ModuleSwap
    from .module_choice import choose_modules

    progress = progress or silent()
    if ctx.run is not None:
        progress(0.0, f"rebuilding T' of run {ctx.run}")
        env = load_run(ctx.run)
        rebuilt = rebuild_transplant(env, ctx.store or ModelStore(), ctx.options.device)
        progress(1.0, "T' rebuilt; weight hashes match the run")
        return rebuilt
    chosen, explicit = choose_modules(ctx, k, modules, progress.sub(0.0, 0.9))
    swap = ModuleSwap(ctx.target, ctx.donor, [m["name"] for m in chosen])
    progress(0.9, f"swapping {len(swap.modules)} modules into a working copy")
    swap.apply()
    source = {
        "kind": "swap",
        "run_id": None,
        "tool": "swap",
        "operation": "module-swap",
        "donor": ctx.donor.spec.ref,
        "target": ctx.target.spec.ref,
        "modules": list(swap.modules),
        "selection": "explicit" if explicit else "top-k",
        "weight_hash_before": swap.hash_before(),
        "weight_hash_after": swap.weight_hash(),
    }
    progress(1.0, "T' ready")
    return Rebuilt(ctx.target, swap.working, as_dmodel(ctx.donor), swap.rollback, swap, source)


# ---------------------------------------------------------------------------------------------
# Stability checks (docs/methods.md T12): each returns {"passed": bool, "detail": one line, ...numbers}


def reapply_check(edit: Any, recorded: Optional[str] = None) -> dict[str, Any]:
    """The same transplant applied twice gives identical weight hashes: hash T' (applied), roll
    back (T's hash and a tensor-by-tensor comparison must come back), apply again, hash again.
    ``recorded``: the hash of T' the run recorded, which the first application must equal too.
    Leaves the edit applied."""
    first = edit.weight_hash()
    edit.rollback()
    back = edit.weight_hash() == edit.hash_before() and bool(edit.verify_rollback())
    edit.apply()
    second = edit.weight_hash()
    same = first == second
    matches = recorded is None or first == recorded
    passed = bool(same and back and matches)
    if passed:
        detail = f"applied twice: identical weight hash {first[:12]}" + (
            ", equal to the run's" if recorded else ""
        )
    else:
        why = [
            w
            for ok, w in (
                (same, f"hashes differ ({first[:12]} then {second[:12]})"),
                (back, "the roll back in between did not restore T bit-exactly"),
                (matches, f"the first hash {first[:12]} is not the run's {str(recorded)[:12]}"),
            )
            if not ok
        ]
        detail = "; ".join(why)
    return {
        "passed": passed,
        "detail": detail,
        "hash_first": first,
        "hash_second": second,
        "rollback_bit_exact": back,
        "hash_recorded": recorded,
    }


def save_for_check(
    working: nn.Module, tokenizer: Any, folder: Any, source: dict[str, Any], edit: Any = None
) -> Any:
    """Save T' as a Hugging Face folder + surgery.json (what a user would save and reload), through
    the edit's own saver when it has one (a bridged organ keeps its bridges beside the folder)."""
    from ..surgery.transplant import save_transplant

    card = {"operation": "stability check", "source": source}
    if edit is not None and hasattr(edit, "save_card"):
        return edit.save_card(folder, card)
    return save_transplant(working, tokenizer, folder, card)


def reload_check(
    folder: Any,
    texts: Any,
    ppl_before_save: Optional[float],
    nll_before_save: list[Optional[float]],
    device: Any,
    dtype: str,
    *,
    batch_size: int = 8,
    max_length: int = 256,
) -> dict[str, Any]:
    """A saved T' reloaded gives identical perplexity: load ``folder`` afresh (never from the model
    cache), score ``texts`` exactly as before saving, and compare each text's mean loss with
    ``nll_before_save`` (T' before saving) for equality. Also says whether the reloaded weights
    hash as the folder's surgery.json recorded."""
    import json
    from pathlib import Path

    from ..evaluation.evaluate import perplexity
    from ..loading.models import load_model, state_dict_hash
    from ..surgery.organ_bridge import ATTR as BRIDGES_ATTR

    loaded = load_model(ModelSpec.parse(str(folder)), device, dtype)
    rep = perplexity(
        loaded.model, loaded.tokenizer, list(texts), batch_size=batch_size, max_length=max_length
    )
    card = json.loads((Path(folder) / "surgery.json").read_text())
    # The folder's hash covers its Hugging Face weights; a bridged organ's bridges are re-attached from
    # bridges.safetensors beside them (engine.surgery.organ_bridge), so they are left out of this comparison.
    weights = {k: v for k, v in loaded.model.state_dict().items() if not k.startswith(f"{BRIDGES_ATTR}.")}
    hash_ok = state_dict_hash(weights) == card.get("saved_weight_hash")
    del loaded
    return reload_verdict(rep, ppl_before_save, nll_before_save, hash_ok)


def reload_verdict(
    rep: dict[str, Any],
    ppl_before_save: Optional[float],
    nll_before_save: list[Optional[float]],
    hash_ok: bool,
) -> dict[str, Any]:
    """The reload check's outcome: ``rep`` (the reloaded T''s perplexity report) against T' before
    saving, text by text, for equality; ``hash_ok``: the reloaded weights hash as the folder recorded."""
    import math

    def finite(v: Any) -> Optional[float]:
        return float(v) if v is not None and math.isfinite(float(v)) else None

    after = [finite(v) for v in rep["per_text_nll"]]
    before = [finite(v) for v in nll_before_save]
    pairs = list(zip(after, before))
    diffs = [abs(a - b) for a, b in pairs if a is not None and b is not None]
    same = (
        len(after) == len(before)
        and all((a is None) == (b is None) for a, b in pairs)
        and all(d == 0.0 for d in diffs)
    )
    ppl = finite(rep["ppl"])
    was = f"{ppl_before_save:.6g}" if ppl_before_save is not None else "undefined"
    now = f"{ppl:.6g}" if ppl is not None else "undefined"
    detail = (
        f"saved and reloaded: perplexity {was} -> {now}, identical loss on all {len(after)} texts"
        if same
        else f"saved and reloaded: perplexity {was} -> {now}, max per-text loss change "
        f"{max(diffs) if diffs else 0.0:.3g}"
    )
    return {
        "passed": bool(same),
        "detail": detail,
        "ppl_before_save": ppl_before_save,
        "ppl_reloaded": ppl,
        "max_abs_loss_change": max(diffs) if diffs else None,
        "weight_hash_matches_card": bool(hash_ok),
        "n_texts": len(after),
    }
