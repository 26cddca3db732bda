"""Start here: what Graft does and the steps of a first visit."""

import streamlit as st

from ui.entry import require_app_entry  # streamlit only: light

# Outside app.py's router (a fresh server's first run, an AppTest of this file) app.py runs in
# this page's place, before the engine is imported here (the imports below are after it on purpose).
require_app_entry()

from engine.api import (  # noqa: E402
    DEMO_DONOR,
    SMOLLM2,
    all_tools,  # noqa: E402
)
from ui.boot import TAGLINE, TITLE  # noqa: E402
from ui.navigation import app_pages  # noqa: E402
from ui.sidebar import TINY_PAIR  # noqa: E402
from ui.state import selection  # noqa: E402
from ui.text import md  # noqa: E402


def cell(text: str) -> str:
    return text.replace("|", "\\|")  # a literal pipe inside a Markdown table cell


st.title(TITLE)
st.markdown(TAGLINE)

sel = selection()
preselected = {
    TINY_PAIR: "The tiny random pair is preselected so every tool runs in seconds; build the demo donor "
    "(sidebar) for a real SmolLM2 pair.",
    (DEMO_DONOR, SMOLLM2): "The demo pair is preselected: SmolLM2 and its concept-tuned donor.",
}.get((sel.donor_text, sel.target_text), "")

with st.container(border=True):
    st.markdown("#### Start here")
    st.markdown(
        f"1. **Pick two models** in the sidebar: a donor and a target. {preselected}\n"
        "2. **Check the pair on Models**: the compatibility report (T1) says which transplant "
        "operations fit, and why.\n"
        "3. **Run Alignment**: the layer similarity map (T2), per-layer Procrustes residuals (T3) and "
        "bridge sufficiency (T4) show where the two models agree.\n"
        "4. **Ask Go / no-go**: one recommendation per operation from T1-T4, with the evidence behind each "
        "line, or the reason none is viable.\n"
        "5. **Map the concept** on Concept: where the donor's adapter (or full fine-tune) wrote it (T5), "
        "each module's spectrum and rank (T6), and the rank-k conjugation that carries it into a target in "
        "other coordinates, rolled back automatically if it hurts the retained set.\n"
        "6. **Transplant** (same family): rank modules (T7), swap the top K into a copy of the target "
        "(T11) or sweep K (T8); or move whole blocks on **Organs** (direct or bridged insertion, position "
        "sensitivity T9, bridge deviation T10). Roll back or save T′ in one click.\n"
        "7. **Compare** T, T′ and D: perplexities, task score, TIR, Recovery and the answers side by side; "
        "build the surgery report there.\n"
        "8. **Read the Verdict**: what the transplant broke (T12) and where it changed the computation "
        "(T13).\n"
        "9. **Revisit results in Runs**: every run is kept, with its parameters and a JSON download."
    )
    links = app_pages()[1:]  # the navigation's own pages after this one, in its order
    for col, pg in zip(st.columns(len(links)), links):
        col.page_link(pg, label=pg.title, icon=pg.icon)

st.markdown("#### Current pair")
left, right = st.columns(2)
left.metric("Donor", md(sel.donor_text) or "—", border=True)  # a metric's value is markdown too
right.metric("Target", md(sel.target_text) or "—", border=True)
if not sel.ok:
    st.warning("Fix the model choice in the sidebar first.", icon=":material/warning:")

st.markdown("#### Tools")
rows = "\n".join(
    f"| **{t.code}** | {cell(t.title)} | {cell(t.page)} | {cell(t.summary)} |" for t in all_tools()
)
st.markdown("| code | tool | page | what it shows |\n| --- | --- | --- | --- |\n" + rows)
