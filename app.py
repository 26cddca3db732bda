"""Graft: the Streamlit entry point. It only routes; pages live in pages/, shared UI in ui/."""
import streamlit as st

st.set_page_config(page_title="Graft · model surgery", page_icon="🌿", layout="wide")

from ui.entry import routing  # noqa: E402  (after set_page_config: the first paint comes first)
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
