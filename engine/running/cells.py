"""Grids of independent cells, run in this process or on Ray workers, by one code path.

A sweep tool (T8's K values, T9's positions and seeds) describes its work as *cells*: small
JSON dicts, each measured by one module-level function ``cell_fn(ctx, shared, cell, progress)``
that returns a JSON dict. ``shared`` is what every cell reads (ranked module names, the tool's
parameters); anything a cell builds once per process (a working copy, the organ's source model,
the evaluation sets) goes in ``ctx.memo``. An optional ``finish_fn(ctx, shared)`` runs once per
process at the end (T8 checks there that its working copy rolled back bit-exactly).

:func:`run_cells` runs the cells in order in this process when ``--ray`` is empty (the default:
nothing about Ray is imported). With ``--ray auto`` or ``--ray ADDRESS`` it hands them to
:mod:`engine.running.ray_cells`, whose workers rebuild the same context from a :class:`Recipe`
(models by spec, that is by path or built-in name, never pickled) and call the same functions.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..core.errors import GraftError
from ..core.params import RunOptions, build_params
from ..core.progress import Progress, silent
from ..loading.models import ModelSpec, ModelStore
from .context import ToolContext

CellFn = Callable[[ToolContext, dict, dict, Progress], dict]
FinishFn = Callable[[ToolContext, dict], dict]

# "auto" or host:port / ray://host:port (a running cluster's GCS address)
_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")
LOADABLE = ("builtin", "path", "gguf", "hub")  # spec kinds a worker can load by itself


def check_ray_option(value: str) -> None:
    """A one-line error for a ``--ray`` value that is neither empty, ``auto`` nor an address."""
    v = (value or "").strip()
    if v and v != "auto" and not _ADDRESS.match(v):
        raise GraftError(
            f"--ray expects auto (a local Ray started on demand) or a running cluster's address "
            f"(host:port or ray://host:port), got {v!r}"
        )


@dataclass(frozen=True)
class Recipe:
    """How a worker rebuilds a run's context: the tool, the models by spec and the options."""

    tool: str
    options: dict[str, Any]
    workload: bool = False  # the run reads the workload (options.workload, or the bundled set)
    donor: Optional[ModelSpec] = None
    target: Optional[ModelSpec] = None
    base: Optional[ModelSpec] = None
    adapter: Optional[str] = None
    organ: Optional[str] = None
    run: Optional[str] = None


@dataclass(frozen=True)
class Grid:
    """A sweep's cells as a worker receives them: functions by ``module:qualname``."""

    fn: str
    shared: dict[str, Any]
    cells: list[dict[str, Any]]
    label: Callable[[dict[str, Any]], str]
    finish: Optional[str] = None


@dataclass
class CellRun:
    """The cells' results in cell order; a failed cell (Ray only: its worker died twice) is None
    with its message in ``failed``. ``finish`` holds each process's ``finish_fn`` result."""

    results: list[Optional[dict[str, Any]]]
    failed: dict[int, str] = field(default_factory=dict)
    finish: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def fn_name(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of a module-level function (what a worker imports)."""
    name = f"{fn.__module__}:{fn.__qualname__}"
    if "<" in fn.__qualname__:
        raise ValueError(f"cell functions must be module-level, got {name}")
    return name


def resolve_fn(name: str) -> Callable[..., Any]:
    module, _, qual = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def recipe_of(ctx: ToolContext) -> Recipe:
    """The recipe of ``ctx``; a one-line error when a model exists only in this process."""
    if not ctx.tool:
        raise GraftError("this run has no tool name, so Ray workers cannot rebuild it")
    specs: dict[str, Optional[ModelSpec]] = {}
    for role in ("donor", "target", "base"):
        m = getattr(ctx, role)
        if m is None:
            specs[role] = None
            continue
        if m.spec.kind not in LOADABLE:
            raise GraftError(
                f"--ray: the {role} {m.label} exists only in this process; Ray workers load models by "
                "path or built-in name (save it as a folder first, or run without --ray)"
            )
        specs[role] = m.spec
    return Recipe(
        tool=ctx.tool,
        options={**dataclasses.asdict(ctx.options), "ray": ""},
        workload=ctx.workload is not None,
        adapter=ctx.adapter,
        organ=ctx.organ,
        run=ctx.run,
        **specs,
    )


def worker_context(recipe: Recipe, store: ModelStore) -> ToolContext:
    """The context a worker runs cells in: the recipe's models loaded from their specs."""
    from ..core.data import resolve_workload

    options = build_params(RunOptions, recipe.options)
    loaded = {
        role: None if spec is None else store.get(spec, options.device, options.dtype, silent())
        for role, spec in (("donor", recipe.donor), ("target", recipe.target), ("base", recipe.base))
    }
    return ToolContext(
        loaded["donor"],
        loaded["target"],
        resolve_workload(options.workload) if recipe.workload else None,
        options,
        base=loaded["base"],
        adapter=recipe.adapter,
        organ=recipe.organ,
        run=recipe.run,
        store=store,
        tool=recipe.tool,
    )


def run_cells(
    ctx: ToolContext,
    cell_fn: CellFn,
    shared: dict[str, Any],
    cells: list[dict[str, Any]],
    progress: Progress,
    label: Callable[[dict[str, Any]], str],
    finish_fn: Optional[FinishFn] = None,
) -> CellRun:
    """Run ``cell_fn`` on every cell, here or on Ray (``ctx.options.ray``); see the module doc.

    Progress moves once per finished cell on Ray, and within each cell here. A cancel stops the
    work at once in both routes (on Ray every worker is killed) and raises ``Cancelled``."""
    address = (getattr(ctx.options, "ray", "") or "").strip()
    if address and cells:
        from .ray_cells import run_on_ray  # Ray is imported only on this route

        models = [m for m in (ctx.donor, ctx.target, ctx.base) if m is not None and not m.streamed]
        nbytes = sum(t.numel() * t.element_size() for m in models for t in m.model.state_dict().values())
        grid = Grid(fn_name(cell_fn), shared, cells, label, None if finish_fn is None else fn_name(finish_fn))
        out = run_on_ray(recipe_of(ctx), grid, progress, address, nbytes)
        ctx.meta["ray"] = out.meta
        if out.failed:  # said with the other notes (stderr, the page), not only in meta.ray
            ctx.meta.setdefault("notes", []).append(
                f"{len(out.failed)} of {len(cells)} cells have no numbers: " + "; ".join(out.meta["failed"])
            )
        return out
    results: list[Optional[dict[str, Any]]] = []
    n = len(cells)
    for i, cell in enumerate(cells):
        sub = progress.sub(i / n, (i + 1) / n)
        sub(0.0, label(cell))
        results.append(cell_fn(ctx, shared, cell, sub))
        sub(1.0, f"{label(cell)}: done")
    return CellRun(results, finish=[finish_fn(ctx, shared)] if finish_fn is not None else [])
