"""Start here: what Graft does and the three steps of a first visit."""
import streamlit as st

from engine.registry import all_tools
from ui.entry import require_app_entry
from ui.sidebar import verdict_badges
from ui.state import selection

require_app_entry()

st.title("🌿 Graft")
st.markdown("Model surgery workbench: measure how two language models line up, layer by layer, "
            "before moving knowledge from a **donor** into a **target**.")

with st.container(border=True):
    st.markdown("#### Start here")
    st.markdown(
        "1. **Pick two models** in the sidebar: a donor and a target. The tiny random pair is "
        "preselected so every tool runs in seconds.\n"
        "2. **Check the pair on Models**: the compatibility report (T1) says which transplant "
        "operations fit, and why.\n"
        "3. **Run Alignment**: the layer similarity map (T2), per-layer Procrustes residuals (T3) and "
        "bridge sufficiency (T4) show where the two models agree.\n"
        "4. **Revisit results in Runs**: every run is kept, with its parameters and a JSON download."
    )
    cols = st.columns(3)
    cols[0].page_link("pages/models.py", label="Models", icon=":material/memory:")
    cols[1].page_link("pages/alignment.py", label="Alignment", icon=":material/grid_on:")
    cols[2].page_link("pages/runs.py", label="Runs", icon=":material/history:")

sel = selection()
st.markdown("#### Current pair")
left, right = st.columns(2)
left.metric("Donor", sel.donor_text or "—", border=True)
right.metric("Target", sel.target_text or "—", border=True)
if not sel.ok:
    st.warning("Fix the model choice in the sidebar first.", icon=":material/warning:")

st.markdown("#### Tools")
st.dataframe(
    [{"code": t.code, "tool": t.title, "page": t.page, "what it shows": t.summary} for t in all_tools()],
    hide_index=True,
    column_config={"code": st.column_config.TextColumn(width="small"),
                   "what it shows": st.column_config.TextColumn(width="large")},
)
