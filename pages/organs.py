"""Organs: organ transplantation (NOT). Extract an organ from the donor, train it standalone,
insert it into the target (direct or bridged), and check where it fits: T9 position sensitivity
against T4's prediction, T10 bridge deviation."""

import streamlit as st

from ui.entry import require_app_entry  # streamlit only: light

# Outside app.py's router (a fresh server's first run, an AppTest of this file) app.py runs in
# this page's place, before the engine is imported here (the imports below are after it on purpose).
require_app_entry()

from ui.jobs import tool_panel  # noqa: E402
from ui.organs import inputs_for, insert_details, organ_picker  # noqa: E402

HOW_TO_READ = {
    "organ-extract": "the donor's blocks, the organ's in colour. The checkpoint (organ.safetensors + "
    "organ.json) "
    "records the source, its weight hash, the layers, the architecture and T1's signature.",
    "organ-train": "the causal LM loss of embeddings → organ → head per step; only the organ learns. The "
    "trained "
    "organ is a new checkpoint; its card keeps the training configuration and metrics.",
    "organ-insert": "perplexities and task score of T, T′ and D (concept perplexity on the held-out test "
    "questions). Bridged strategies train W_in and W_out from the identity, or fit them in closed form "
    "(training-free); their distance from the identity says how far the streams are apart. Compare a "
    "trained strategy with the control, which trains the same blocks with no organ.",
    "position-sweep": "perplexity with the organ at each position (lower is better) and T4's epsilon for "
    "the same "
    "(s, p) on the right axis: when the pre-surgery check predicts the outcome, the curves rise "
    "and fall together (Spearman near +1).",
    "bridge-deviation": "‖W − I‖_F of the input and output bridges at each position: closed-form, and "
    "trained from "
    "the identity on growing shares of the texts. Small = the organ fits there almost as is.",
}

st.title("Organs")
st.markdown(
    "An **organ** is `k` contiguous blocks of the donor (the sidebar's **donor**), from block `s`. Extract "
    "it, optionally train it on its own between the donor's frozen embeddings and head, then put it into "
    "the sidebar's **target** at block `p`: directly, or between affine bridges fitted in closed form. "
    "Every insertion is reversible (bit-exact roll back) and can be saved as a model. **T9** tries every "
    "position and checks T4's prediction; **T10** measures how far the bridges move from the identity."
)
with st.container(border=True):
    tool_panel(
        "organ-extract",
        how_to_read=HOW_TO_READ["organ-extract"],
        inputs=inputs_for("organ-extract", None, None),
    )
with st.container(border=True):
    st.markdown("**Organ used below**")
    organ, organ_error = organ_picker()
for name, details in (
    ("organ-train", None),
    ("organ-insert", insert_details),
    ("position-sweep", None),
    ("bridge-deviation", None),
):
    with st.container(border=True):
        tool_panel(
            name, how_to_read=HOW_TO_READ[name], details=details, inputs=inputs_for(name, organ, organ_error)
        )
