"""Every page runs inside app.py (router, page config, shared sidebar), with public APIs only.

With a ``pages/`` folder beside the entry point, Streamlit serves a fresh server's very first
script run the legacy way: it executes the requested page file directly, without app.py, until
some session has called ``st.navigation`` (documented: from then on the folder is ignored by all
sessions). Streamlit's own page list for that legacy run is hidden by the
``client.showSidebarNavigation = false`` setting, so the user never sees it.

app.py runs each page inside :func:`routing`. A page file that finds itself run outside it (that
first legacy run, or an AppTest that opens a page file) runs app.py in its place within the same
script run, so widget clicks are not lost: app.py's ``st.navigation`` routes back to this page
with the sidebar. Then the direct run stops.
"""

from __future__ import annotations

import runpy
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import streamlit as st

APP = Path(__file__).resolve().parent.parent / "app.py"
_state = threading.local()  # each script run executes on its own thread


@contextmanager
def routing() -> Iterator[None]:
    """Mark the page run by app.py's router as routed."""
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth


def routed() -> bool:
    return getattr(_state, "depth", 0) > 0


def require_app_entry() -> None:
    if routed():
        return
    runpy.run_path(str(APP), run_name="__main__")
    st.stop()
