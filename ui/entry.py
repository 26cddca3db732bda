"""Make sure every page runs inside app.py (router, page config, shared sidebar).

Streamlit treats an app with a ``pages/`` folder as a v1 multipage app until ``st.navigation`` is
first called in the process: the very first run on a fresh server (and every AppTest run, which
resets that flag) executes the requested page file directly, skipping app.py. A page that finds
itself run that way switches the flag off, runs app.py in its place (which routes back to this
page, with the sidebar) within the same script run, so widget clicks are not lost, then stops.
"""
from __future__ import annotations

import runpy
from pathlib import Path

import streamlit as st

APP = Path(__file__).resolve().parent.parent / "app.py"


def require_app_entry() -> None:
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # pragma: no cover - layout of a future Streamlit
        return
    if getattr(PagesManager, "uses_pages_directory", None):
        PagesManager.uses_pages_directory = False
        runpy.run_path(str(APP), run_name="__main__")
        st.stop()
