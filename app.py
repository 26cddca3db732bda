"""Graft: the Streamlit entry point. It only routes; pages live in pages/, shared UI in ui/."""
import streamlit as st

from ui.navigation import app_pages
from ui.sidebar import render_sidebar

st.set_page_config(page_title="Graft · model surgery", page_icon="🌿", layout="wide")
page = st.navigation(app_pages())
render_sidebar()
page.run()
