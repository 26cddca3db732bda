"""The app's pages: the fixed ones in pages/, plus one generic page per registry ``page`` name
that has no file of its own (so a newly registered tool shows up without touching the UI)."""

from __future__ import annotations

import re
from typing import Callable

import streamlit as st

from engine.api import all_tools

FILE_PAGES = (
    "Models",
    "Alignment",
    "Go / no-go",
    "Concept",
    "Transplant",
    "Organs",
    "Compare",
    "Verdict",
)  # registry page names served by a file in pages/
TOOL_PAGE_ICON = ":material/biotech:"


def app_pages() -> list[st.Page]:
    pages = [
        st.Page("pages/home.py", title="Start here", icon=":material/flag:", default=True),
        st.Page("pages/models.py", title="Models", icon=":material/memory:"),
        st.Page("pages/alignment.py", title="Alignment", icon=":material/grid_on:"),
        st.Page("pages/gonogo.py", title="Go / no-go", icon=":material/fact_check:"),
        st.Page("pages/concept.py", title="Concept", icon=":material/hub:"),
        st.Page("pages/transplant.py", title="Transplant", icon=":material/biotech:"),
        st.Page("pages/organs.py", title="Organs", icon=":material/join_inner:"),
        st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
        st.Page("pages/verdict.py", title="Verdict", icon=":material/gavel:"),
    ]
    for name in tool_page_names():
        if name not in FILE_PAGES:
            pages.append(st.Page(_generic_page(name), title=name, icon=TOOL_PAGE_ICON, url_path=_slug(name)))
    pages.append(st.Page("pages/runs.py", title="Runs", icon=":material/history:"))
    return pages


NAV_KEY = "graft-nav"  # the sidebar container of the navigation (CSS class st-key-graft-nav)


def render_nav(pages: list[st.Page]) -> None:
    """The app's navigation, drawn in the sidebar with page links (Streamlit's own list is off)."""
    with st.sidebar.container(key=NAV_KEY):
        for p in pages:
            st.page_link(p, label=p.title, icon=p.icon)
        st.divider()


def tool_page_names() -> list[str]:
    """Registry page names in the order of their first tool (T1, T2, ...)."""
    names: list[str] = []
    for tool in all_tools():
        if tool.page not in names:
            names.append(tool.page)
    return names


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "tools"


def _generic_page(name: str) -> Callable[[], None]:
    def render() -> None:
        from ui.toolpage import render_tool_page

        render_tool_page(name)

    render.__name__ = f"page_{_slug(name).replace('-', '_')}"
    return render
