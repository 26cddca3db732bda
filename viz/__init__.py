"""Figures for Graft: result dicts in, Plotly figures out. ``viz`` computes nothing.

* :func:`figure_for` builds the figure of any registered tool from its JSON envelope
  ``{"tool", "donor", "target", "result": {...}, "meta": {...}}``.
* :data:`DOWNLOAD_CONFIG` / :func:`download_config` are Plotly configs for ``st.plotly_chart`` and
  ``fig.to_html`` whose modebar camera saves a 2x PNG with a meaningful file name.
* :func:`figure_html` gives a standalone HTML page (plotly.js inline) for a download button.

The engine is imported lazily (inside :func:`figure_for`) so importing ``viz`` never pulls in
torch or the engine's numerics.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any, Callable, Optional

import plotly.graph_objects as go

__all__ = ["figure_for", "resolve_figure", "DOWNLOAD_CONFIG", "download_config", "figure_html"]

DOWNLOAD_CONFIG: dict[str, Any] = {
    "displaylogo": False,
    "responsive": True,
    "modeBarButtonsToRemove": ["lasso2d", "select2d"],
    "toImageButtonOptions": {
        "format": "png",
        "filename": "graft-figure",
        "scale": 2,  # 2x the on-screen size: sharp in slides and papers
    },
}


def resolve_figure(path: str) -> Callable[[dict], go.Figure]:
    """Import ``"viz.module:function"``."""
    if ":" not in path:
        raise ValueError(f"figure path must be 'module:function', got {path!r}")
    mod_name, func_name = path.split(":", 1)
    module = importlib.import_module(mod_name)
    try:
        return getattr(module, func_name)
    except AttributeError as e:
        raise ValueError(f"{mod_name} has no figure function {func_name!r}") from e


def figure_for(tool_name: str, envelope: dict) -> go.Figure:
    """The figure of ``tool_name`` for one result envelope (the whole envelope is passed on, so
    the figure can title itself with the donor and target names)."""
    from engine.api import get_tool  # lazy: keeps `import viz` free of torch

    tool = get_tool(tool_name)
    return resolve_figure(tool.figure)(envelope)


def _filename_of(fig: Optional[go.Figure]) -> Optional[str]:
    if fig is None:
        return None
    meta = fig.layout.meta
    if isinstance(meta, dict):
        name = meta.get("graft_filename")
        return str(name) if name else None
    return None


def download_config(fig: Optional[go.Figure] = None, filename: Optional[str] = None) -> dict[str, Any]:
    """:data:`DOWNLOAD_CONFIG` with the PNG file name taken from ``filename`` or the figure
    (every Graft figure stores one, e.g. ``graft_T2_cka_tiny-gpt2-a_vs_tiny-llama-b``)."""
    cfg = copy.deepcopy(DOWNLOAD_CONFIG)
    name = filename or _filename_of(fig)
    if name:
        cfg["toImageButtonOptions"]["filename"] = name
    return cfg


def figure_html(fig: go.Figure, config: Optional[dict[str, Any]] = None) -> str:
    """A full standalone HTML page with plotly.js inline (works offline)."""
    return fig.to_html(full_html=True, include_plotlyjs=True, config=config or download_config(fig))
