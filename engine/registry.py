"""The tool registry: every diagnostic is registered once, and one conformance test runs over all.

A tool is (name, code, title, params class, compute function, figure builder path). The
figure builder lives in ``viz/`` and is referenced by dotted path so ``engine/`` never imports
plotly.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from .errors import GraftError
from .params import param_specs


@dataclass(frozen=True)
class Tool:
    name: str  # CLI sub-command, e.g. "cka"
    code: str  # METHODS.md id, e.g. "T2"
    title: str
    summary: str
    params_cls: type
    compute: Callable[..., Any]  # compute(ctx: ToolContext, params, progress) -> result dataclass
    figure: str  # "viz.module:function", takes the result dict and returns a plotly Figure
    page: str  # which app page shows it
    same_family: bool = False  # True: needs donor and target of one family and tokenizer (module swaps)


_REGISTRY: dict[str, Tool] = {}


def register(tool: Tool) -> Tool:
    """Add a tool; refuses duplicates and malformed tools (checked here, once)."""
    if tool.name in _REGISTRY:
        raise ValueError(f"tool {tool.name} is already registered")
    if not dataclasses.is_dataclass(tool.params_cls) or not tool.params_cls.__dataclass_params__.frozen:
        raise TypeError(f"{tool.name}: params must be a frozen dataclass")
    for spec in param_specs(tool.params_cls):
        if not spec.help:
            raise TypeError(f"{tool.name}: parameter {spec.name} has no help text")
    sig = list(inspect.signature(tool.compute).parameters)
    if sig[:3] != ["ctx", "params", "progress"]:
        raise TypeError(f"{tool.name}: compute must take (ctx, params, progress)")
    if ":" not in tool.figure or not tool.figure.startswith("viz."):
        raise TypeError(f"{tool.name}: figure must be 'viz.module:function'")
    _REGISTRY[tool.name] = tool
    return tool


def get_tool(name: str) -> Tool:
    _load_builtin_tools()
    if name not in _REGISTRY:
        raise GraftError(f"unknown tool '{name}': choose from {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def all_tools() -> list[Tool]:
    _load_builtin_tools()
    return sorted(_REGISTRY.values(), key=lambda t: (int(t.code[1:]), t.name))


def _load_builtin_tools() -> None:
    from . import tools  # noqa: F401  (importing registers every built-in tool)
