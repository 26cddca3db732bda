"""Alignment: T2 layer similarity, T3 Procrustes residuals, T4 bridge sufficiency."""

import streamlit as st

from ui.entry import require_app_entry  # streamlit only: light

# Outside app.py's router (a fresh server's first run, an AppTest of this file) app.py runs in
# this page's place, before the engine is imported here (the imports below are after it on purpose).
require_app_entry()

from ui.toolpage import render_tool_panels  # noqa: E402

HOW_TO_READ = {
    "cka": "each cell is the CKA similarity of a donor layer (row) and a target layer (column), "
    "bright = similar; the line is the best layer matching that never goes back in depth.",
    "procrustes": "for each matched layer pair, a low held-out residual means a rotation carries the "
    "donor's representation onto the target's; the ridge line is the best any linear map did.",
    "bridge-check": "each cell is epsilon = 1 − cosine between what a donor organ starting at block s "
    "expects "
    "and what the target feeds it at block p; small (dark) = the organ could be inserted there.",
}

st.title("Alignment")
st.markdown(
    "Where do the donor's and the target's layers represent the same things? Run the tools "
    "top to bottom: T3 uses T2's layer matching, and all three share one forward pass per model."
)
render_tool_panels("Alignment", HOW_TO_READ)
