"""Graft: the Streamlit entry point. It only routes; pages live in pages/, shared UI in ui/."""

import streamlit as st

st.set_page_config(page_title="Graft · model surgery", page_icon="🌿", layout="wide")

from ui.boot import ensure_engine  # noqa: E402  (streamlit and the standard library only)

# A fresh server paints the heading first, then imports torch, transformers and the tools.
ensure_engine()

from ui.entry import routing  # noqa: E402
from ui.navigation import app_pages, render_nav  # noqa: E402
from ui.sidebar import render_sidebar  # noqa: E402

pages = app_pages()
# Streamlit's own page list is off (.streamlit/config.toml: client.showSidebarNavigation = false),
# so the legacy pages/ list never shows; the sidebar draws this navigation itself.
page = st.navigation(pages, position="hidden")
render_nav(pages)
render_sidebar()
with routing():
    page.run()
