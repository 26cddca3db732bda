"""The first paint comes before the engine.

Importing torch, transformers and every tool takes seconds (about 4 s on 2 CPU cores), once per
server process. app.py calls :func:`ensure_engine` right after ``st.set_page_config``: on a fresh
server it draws the app's heading and a spinner at once, imports the engine, clears them and goes
on with the normal run (no rerun, so no click is lost). Every later run finds the engine imported
and draws nothing here. This module imports streamlit and the standard library only.
"""

from __future__ import annotations

import importlib
import threading
import time

import streamlit as st

TITLE = "Graft"
TAGLINE = (
    "Model surgery workbench: measure how two language models line up, layer by layer, "
    "move knowledge from a **donor** into a **target**, and compare the target before and after."
)
# What app.py needs before it can route (the tools with torch and transformers, the navigation, the
# sidebar), then what the pages import (plotly through viz), so that no first visit of a page pays
# an import.
ENGINE_MODULES = (
    "engine.api",
    "ui.navigation",
    "ui.sidebar",
    "ui.jobs",
    "ui.toolpage",
    "ui.concept",
    "ui.organs",
    "ui.transplant",
    "ui.verdict",
    "viz",
    "viz.compare",
    "viz.gonogo",
    "viz.report",
)

_lock = threading.Lock()  # two first sessions import once, one after the other (no import race)
_ready = False
_seconds: float | None = None


def engine_ready() -> bool:
    return _ready


def import_seconds() -> float | None:
    """How long this process took to import the engine (None before it did)."""
    return _seconds


def ensure_engine(modules: tuple[str, ...] = ENGINE_MODULES) -> None:
    """Import ``modules`` once per process, with the app's heading on the screen meanwhile."""
    global _ready, _seconds
    if _ready:
        return
    slot = st.empty()
    with slot.container():
        st.title(TITLE)
        st.markdown(TAGLINE)
        with st.spinner(
            "Starting the engine: importing torch, transformers and the tools "
            "(once per server start, a few seconds)…"
        ):
            with _lock:
                if not _ready:
                    t0 = time.perf_counter()
                    for name in modules:
                        importlib.import_module(name)
                    _seconds = time.perf_counter() - t0
                    _ready = True
    slot.empty()
