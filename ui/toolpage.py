"""A page made of every registered tool whose ``page`` is a given name, one run panel each."""

from __future__ import annotations

from typing import Mapping

import streamlit as st

from engine.api import all_tools
from ui.jobs import tool_panel


def tools_on(page: str) -> list[str]:
    return [t.name for t in all_tools() if t.page == page]


def render_tool_panels(page: str, how_to_read: Mapping[str, str] = {}) -> None:
    """One bordered section per tool of ``page``, in registry order (T1, T2, ...)."""
    for name in tools_on(page):
        with st.container(border=True):
            tool_panel(name, how_to_read=how_to_read.get(name, ""))


def render_tool_page(page: str) -> None:
    st.title(page)
    names = tools_on(page)
    if not names:
        st.info(f"No tool is registered for the {page} page yet.")
        return
    render_tool_panels(page)
