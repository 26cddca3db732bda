"""The one path from inputs to a result: :func:`run_tool` loads the models a tool needs, builds its
:class:`~engine.running.context.ToolContext`, runs it and returns the JSON-safe envelope. The CLI, the job
runner, the benches and the tests all call it. It lives apart from the context so that the tools,
which import the context, never import the registry's caller (no import loop)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

from ..core.data import resolve_workload
from ..core.errors import GraftError
from ..core.jsonsafe import strict
from ..core.params import RunOptions, build_params, check_paths
from ..core.progress import Progress, silent
from ..evaluation.beforeafter import precheck_sets
from ..loading.models import LoadedModel, ModelSpec, ModelStore, resolve_device
from ..measure.capture_cache import DEFAULT_CACHE, CaptureCache
from .cells import check_ray_option
from .context import ToolContext
from .memplan import MemoryPlan, plan_run, refusal
from .registry import get_tool


def run_tool(
    tool_name: str,
    donor: ModelSpec | LoadedModel | None = None,
    target: ModelSpec | LoadedModel | None = None,
    options: RunOptions | dict | None = None,
    params: Any = None,
    *,
    base: ModelSpec | LoadedModel | None = None,
    adapter: Optional[str] = None,
    organ: Optional[str] = None,
    run: Optional[str] = None,
    store: Optional[ModelStore] = None,
    progress: Optional[Progress] = None,
    captures: Optional[CaptureCache] = None,
    live: Any = None,
) -> dict[str, Any]:
    """Run a registered tool end to end and return ``{"tool", "donor", "target", "result", "meta"}``
    (plus ``"base"`` / ``"adapter"`` / ``"organ"`` / ``"run"`` when the tool took them).

    The inputs must fit one of the tool's ``needs`` alternatives (one line otherwise). This is the
    only path from inputs to a result: the CLI, the job runner and the tests call it.
    """
    progress = progress or silent()
    tool = get_tool(tool_name)
    given = {"donor": donor, "target": target, "base": base, "adapter": adapter, "organ": organ, "run": run}
    inferred = base_named_by_adapter(tool, given)
    if inferred is not None:
        base = given["base"] = inferred
    chosen = tool.choose(given)
    if not isinstance(options, RunOptions):
        options = build_params(RunOptions, options or {})
    if not dataclasses.is_dataclass(params):
        params = build_params(tool.params_cls, params or {})
    store = store or ModelStore()
    t0 = time.perf_counter()
    # Bad paths fail here, in one line, before minutes of loading and computing.
    check_paths(options)
    check_ray_option(options.ray)
    check_paths(params)
    precheck_sets(params)
    workload = resolve_workload(options.workload) if tool.uses_workload else None

    specs = {"donor": donor, "target": target, "base": base}
    wanted = [k for k in ("donor", "target", "base") if k in chosen]
    progress(0.0, "planning memory")
    plan = run_plan(tool, [specs[k] for k in wanted], options, params)
    stream = plan is not None and plan.route == "stream"
    placed = plan.placement if plan is not None and plan.route == "dispatch" else []
    for k in wanted:
        m = specs[k]
        if isinstance(m, LoadedModel) and m.streamed and not tool.streams:
            raise GraftError(
                f"{tool.code} reads {m.label} whole and it streams: run {tool.code} with --stream off "
                "(and a --max-memory that holds the pair)"
            )
        if isinstance(m, LoadedModel) and m.dispatched and not tool.dispatches:
            raise GraftError(
                f"{tool.code} reads {m.label}'s weights and accelerate placed it across devices: "
                f"run {tool.code} with --stream on or off"
            )

    def get(m: ModelSpec | LoadedModel, p: Progress, i: int) -> LoadedModel:
        if isinstance(m, LoadedModel):
            return m
        if placed:
            budget = options.max_memory.strip()
            return store.get(
                m, options.device, options.dtype, p, dispatch=placed[i]["max_memory"], dispatch_key=budget
            )
        return store.get(m, options.device, options.dtype, p, stream=stream)

    progress(0.0, "loading models")
    loaded: dict[str, Optional[LoadedModel]] = {"donor": None, "target": None, "base": None}
    for i, key in enumerate(wanted):
        loaded[key] = get(specs[key], progress.sub(0.2 * i / len(wanted), 0.2 * (i + 1) / len(wanted)), i)
    t_load = time.perf_counter() - t0
    ctx = ToolContext(
        loaded["donor"],
        loaded["target"],
        workload,
        options,
        captures or DEFAULT_CACHE,
        live=live,
        base=loaded["base"],
        adapter=adapter if "adapter" in chosen else None,
        organ=organ if "organ" in chosen else None,
        run=run if "run" in chosen else None,
        store=store,
        tool=tool.name,
    )
    if plan is not None:
        ctx.meta["memory_plan"] = plan.as_dict()
    if placed:  # what accelerate made of the plan, model by model
        ctx.meta["placement"] = {
            m.label: m.placement for m in loaded.values() if m is not None and m.dispatched
        }
    if options.ray.strip() and not tool.cells:
        ctx.meta.setdefault("notes", []).append(
            f"--ray {options.ray.strip()}: {tool.code} is not a grid of independent cells, so it ran here"
        )
    if inferred is not None:
        ctx.meta.setdefault("notes", []).append(
            f"base: {inferred.ref}, the model the adapter names as its base"
        )
    t1 = time.perf_counter()
    result = tool.compute(ctx, params, progress.sub(0.2, 1.0))
    t_compute = time.perf_counter() - t1
    progress(1.0, "done")
    payload = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)
    payload, undefined = strict(payload, "result")
    if undefined:
        # An undefined number (0/0, a degenerate layer) is written as null, never as NaN, and said.
        ctx.meta["undefined_values"] = undefined[:50]
        ctx.meta.setdefault("notes", []).append(
            f"{len(undefined)} value(s) were undefined (not a finite number) and are null: "
            + ", ".join(undefined[:5])
            + (" ..." if len(undefined) > 5 else "")
        )
    first = next(m for m in loaded.values() if m is not None) if any(loaded.values()) else None
    envelope: dict[str, Any] = {
        "tool": tool.name,
        "donor": loaded["donor"].spec.ref if loaded["donor"] else None,
        "target": loaded["target"].spec.ref if loaded["target"] else None,
    }
    if loaded["base"] is not None:
        envelope["base"] = loaded["base"].spec.ref
    for key in ("adapter", "organ", "run"):
        if getattr(ctx, key) is not None:
            envelope[key] = getattr(ctx, key)
    envelope["result"] = payload
    envelope["meta"] = {
        "code": tool.code,
        "params": dataclasses.asdict(params),
        "options": dataclasses.asdict(options),
        **(
            {"workload": {"name": workload.name, "sha256": workload.sha256, "n_texts": len(workload.texts)}}
            if workload is not None
            else {}
        ),
        "device": str(first.device) if first is not None else str(resolve_device(options.device)),
        "load_seconds": round(t_load, 4),
        "compute_seconds": round(t_compute, 4),
        **(
            {"bytes_read": sum(m.stream.bytes_read for m in loaded.values() if m is not None and m.streamed)}
            if stream
            else {}
        ),
        **ctx.meta,
    }
    return envelope


def run_plan(tool: Any, models: list[Any], options: RunOptions, params: Any) -> Optional[MemoryPlan]:
    """The memory plan of a run whose models are all given as specs (None when some are loaded
    already, or the tool takes no model); a one-line GraftError when the run cannot fit."""
    if not models or not all(isinstance(m, ModelSpec) for m in models):
        return None
    if options.stream == "on" and not tool.streams:
        raise GraftError(f"{tool.code} reads the models whole; it does not stream (--stream auto or off)")
    if options.stream == "dispatch" and not tool.dispatches:
        raise GraftError(
            f"{tool.code} reads or writes weights, which accelerate's placement keeps off the device: "
            "--stream dispatch runs T2, T3, T4 and T7 (use --stream auto, on or off)"
        )
    try:
        plan = plan_run(
            models,
            dtype=options.dtype,
            device=resolve_device(options.device),
            tokens=options.max_tokens if tool.uses_workload else 0,
            max_memory=options.max_memory,
            stream=options.stream if tool.streams else "off",
            streams=tool.streams,
            activations=tool.uses_workload,
            heldout_fraction=float(getattr(params, "heldout_fraction", 0.25)),
            edits=tool.edits,
            module_rows=tool.module_rows,
            lean=tool.lean,
            stats=getattr(options, "stats", "rows"),
            dispatches=tool.dispatches,
        )
    except GraftError:
        if options.stream != "auto" or options.max_memory.strip():
            raise  # the user asked for a plan: say why there is none
        return None  # the loader says what is wrong with the model, in its own words
    why = refusal(plan, tool.streams)
    if why:
        raise GraftError(why)
    return plan


def pair_labels(envelope: dict[str, Any]) -> tuple[str, str]:
    """(what the run took from, what it looked at) for history rows and captions: donor/target,
    or the adapter (or donor) and its base for tools that read one model's change."""
    src = envelope.get("donor") or envelope.get("adapter") or ""
    dst = envelope.get("target") or envelope.get("base") or ""
    return str(src), str(dst)


def input_labels(refs: dict[str, Any], history: Any = None) -> tuple[str, str]:
    """:func:`pair_labels` for a run's history row; a tool given only a finished run (``--run``) is
    labelled with that run's pair, so the history says what it checked."""
    src, dst = pair_labels(refs)
    if src or dst or not refs.get("run"):
        return src, dst
    from .history import History

    try:
        row = (history or History()).get(str(refs["run"]))
    except GraftError:
        row = None
    return (str(row.get("donor") or ""), str(row.get("target") or "")) if row else (src, dst)


def base_named_by_adapter(tool: Any, given: dict[str, Any]) -> Optional[ModelSpec]:
    """--adapter without --base, for a tool that cannot run on the adapter alone (T11's conjugation
    needs the base's weights): the base the adapter names (a make-donor card's base, the demo
    donor's SmolLM2, or the PEFT config's ``base_model_name_or_path``) when that is a model here, a
    built-in name or a local folder. None otherwise, and the tool's one-line "needs" error stands."""
    present = {k for k, v in given.items() if v not in (None, "")}
    if "base" in present or "adapter" not in present or any(set(alt) <= present for alt in tool.needs):
        return None
    if not any(set(alt) <= present | {"base"} for alt in tool.needs):
        return None
    from ..adapters.lora import resolve_adapter
    from ..core.errors import GraftError

    try:
        hint = resolve_adapter(str(given["adapter"])).base_hint
        spec = ModelSpec.parse(hint) if hint else None
    except GraftError:
        return None
    return spec if spec is not None and spec.kind != "hub" else None
