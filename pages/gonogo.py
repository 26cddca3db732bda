"""Go / no-go: before any surgery, which operation is viable for the sidebar's pair and with which
settings (K, organ positions, rank k and maps), each line with the numbers behind it."""

import streamlit as st

from ui.entry import require_app_entry  # streamlit only: light

# Outside app.py's router (a fresh server's first run, an AppTest of this file) app.py runs in
# this page's place, before the engine is imported here (the imports below are after it on purpose).
require_app_entry()

from ui.jobs import tool_panel  # noqa: E402
from viz.gonogo import evidence_lines, settings_text  # noqa: E402

HOW_TO_READ = (
    "one line per operation: ✓ go with the settings to use, or ✗ no-go with the reason; the evidence "
    "names the diagnostic (T1-T7) each number comes from. Thresholds are under Parameters."
)


def gonogo_details(envelope: dict) -> None:
    r = envelope.get("result") or {}
    line = r.get("recommendation") or ""
    (st.success if line.startswith("go") else st.error)(line, icon=":material/fact_check:")
    ops = r.get("operations") or []
    for col, op in zip(st.columns(max(len(ops), 1)), ops):
        with col.container(border=True):
            badge = ":green-badge[go]" if op.get("go") else ":red-badge[no-go]"
            st.markdown(f"**{op.get('title')}** {badge}")
            if op.get("go"):
                st.markdown(settings_text(op))
            for reason in op.get("reasons") or []:
                st.caption(reason)
            with st.expander("Evidence"):
                st.markdown("\n".join(f"- {x}" for x in evidence_lines(op)) or "—")
    st.caption(
        "Diagnostics run: "
        + ", ".join(r.get("tools_run") or [])
        + ". Measure whether the recommendation held: "
        "run the recommended operation, then build its report on the Compare page."
    )


st.title("Go / no-go")
st.markdown(
    "Before any surgery: T1-T4 on the sidebar's pair (T7 where a swap is possible; T5/T6 when you give an "
    "adapter under Parameters), turned into one recommendation per operation."
)
with st.container(border=True):
    tool_panel("go-no-go", how_to_read=HOW_TO_READ, details=gonogo_details)
