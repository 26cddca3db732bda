"""Verdict: what a transplant broke (T12 interference and stability) and how the answer's
computation changed (T13 attribution, T / T′ / D), for a finished transplant run or a module swap
of the sidebar pair."""

import streamlit as st

from ui.entry import require_app_entry  # streamlit only: light

# Outside app.py's router (a fresh server's first run, an AppTest of this file) app.py runs in
# this page's place, before the engine is imported here (the imports below are after it on purpose).
require_app_entry()

from ui.jobs import tool_panel  # noqa: E402
from ui.verdict import attribution_details, choose_inputs, interference_details  # noqa: E402

st.title("Verdict")
st.markdown(
    "After a transplant: which texts it hurt and whether it is stable (T12), and where in the layers and "
    "tokens the answer now comes from (T13). Choose a finished transplant run (its T′ is rebuilt from the "
    "run and checked against the run's weight hashes), or a module swap of the sidebar pair."
)
inputs = choose_inputs()
with st.container(border=True):
    tool_panel(
        "interference",
        inputs=inputs,
        details=interference_details,
        how_to_read="the histogram is each retained text's loss change T′ − T (right of 0 = hurt); the "
        "worst-hit texts and every prompt whose greedy continuation changed are listed below, "
        "with the changed words marked.",
    )
with st.container(border=True):
    tool_panel(
        "attribution",
        inputs=inputs,
        details=attribution_details,
        how_to_read="each row is a layer (the token embeddings, then each block's output), each column an "
        "input token; red pushes the answer up, blue down; each row sums to F(x) − F(baseline) "
        "up to the convergence delta. T′ − T shows where the transplant changed the computation.",
    )
