"""Models: built-in models and their state, the chosen pair, the T1 compatibility report, and
the demo donor builder."""

from typing import Any

import streamlit as st

from ui.entry import require_app_entry  # streamlit only: light

# Outside app.py's router (a fresh server's first run, an AppTest of this file) app.py runs in
# this page's place, before the engine is imported here (the imports below are after it on purpose).
require_app_entry()

from engine.api import BUILTIN_DESCRIPTIONS, DEMO_DONOR, builtin_status  # noqa: E402
from ui.demo import demo_builder, demo_state  # noqa: E402
from ui.jobs import tool_panel  # noqa: E402
from ui.memory import memory_plan_panel  # noqa: E402
from ui.sidebar import VERDICT_LABELS  # noqa: E402
from ui.state import selection  # noqa: E402
from ui.text import code, md
from ui.toolpage import tools_on  # noqa: E402

STATE_BADGES = {
    "ready": ":green-badge[ready]",
    "needs preparing": ":orange-badge[needs preparing]",
    "needs building": ":orange-badge[needs building]",
    "unavailable": ":gray-badge[unavailable]",
}
KIND_NAMES = {"builtin": "built-in", "path": "local folder", "gguf": "GGUF file", "hub": "Hugging Face cache"}


def model_card(role: str, spec: Any, text: str, status: dict) -> None:
    with st.container(border=True):
        st.markdown(f"**{role}** · {code(text or '—')}")
        if spec is None:
            st.caption("not a valid model (see the sidebar)")
            return
        if spec.kind == "builtin":
            st.markdown(f"{STATE_BADGES.get(status[spec.ref]['state'], '')} {BUILTIN_DESCRIPTIONS[spec.ref]}")
        else:
            st.markdown(f":blue-badge[{KIND_NAMES.get(spec.kind, spec.kind)}] {md(spec.ref)}")


def verdict_details(envelope: dict) -> None:
    """T1's verdict per transplant operation with its reasons."""
    result = envelope["result"]
    st.markdown("**Verdicts**")
    cols = st.columns(len(result["verdicts"]))
    for col, (op, ok) in zip(cols, result["verdicts"].items()):
        with col.container(border=True):
            label = VERDICT_LABELS.get(op, op.replace("_", " "))
            st.markdown(f":green-badge[{label} ✓]" if ok else f":red-badge[{label} ✗]")
            for reason in result["reasons"].get(op, []):
                st.caption(reason)


st.title("Models")
status = builtin_status()
sel = selection()

st.markdown("#### The chosen pair")
left, right = st.columns(2)
with left:
    model_card("Donor", sel.donor, sel.donor_text, status)
with right:
    model_card("Target", sel.target, sel.target_text, status)

memory_plan_panel(sel)

for name in tools_on("Models"):
    with st.container(border=True):
        tool_panel(
            name,
            how_to_read="green cells are fields the two models share, red cells differ; "
            "the verdict column says which transplant operations fit.",
            details=verdict_details if name == "compat" else None,
        )

st.markdown("#### Built-in models")
st.dataframe(
    [
        {"model": name, "state": info["state"], "description": info["description"]}
        for name, info in status.items()
    ],
    hide_index=True,
    column_config={
        "model": st.column_config.TextColumn(width="medium"),
        "state": st.column_config.TextColumn(width="small"),
    },
)
st.caption(
    "ready: loads instantly · needs preparing: converted once from its package on first use · "
    "needs building: trained once on first use · unavailable: its optional package is not installed."
)

with st.container(border=True):
    st.markdown("#### Demo donor")
    st.markdown(
        f"`{DEMO_DONOR}` is SmolLM2-135M-Instruct fine-tuned with LoRA on the bundled concept set: "
        f"a real donor that knows something its base model does not. State: "
        f"{STATE_BADGES.get(demo_state(), demo_state())}"
    )
    demo_builder("models")
