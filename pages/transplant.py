"""Transplant: T7 module ranking, T11 module swap (top-K or hand-picked), T8 K sweep; each a
background job with progress and cancel. A finished swap keeps T' in memory for one-click
roll back and save, and opens on the Compare page."""

from typing import Any

import streamlit as st

from ui.entry import require_app_entry  # streamlit only: light

# Outside app.py's router (a fresh server's first run, an AppTest of this file) app.py runs in
# this page's place, before the engine is imported here (the imports below are after it on purpose).
require_app_entry()

from ui.jobs import tool_panel  # noqa: E402
from ui.state import job_runner, last_job_id  # noqa: E402
from ui.transplant import COMPARE_RUN, transplant_actions  # noqa: E402

MODULES_KEY = "param-swap-modules"  # the swap tool's "modules" parameter widget (ui.jobs._param_prefix)
PICK_KEY = "pick-swap-modules"


def _ranking() -> list[dict[str, Any]]:
    """Modules of this session's last finished T7 ranking, best first."""
    jid = last_job_id("rank-modules")
    job = job_runner().get(jid) if jid else None
    if job is None or job.status != "done" or not job.result:
        return []
    return list(job.result["result"].get("modules") or [])


def _picked_to_param() -> None:
    st.session_state[MODULES_KEY] = ", ".join(st.session_state.get(PICK_KEY) or [])


def module_picker() -> None:
    ranking = _ranking()
    if not ranking:
        st.caption(
            "Run T7 above to pick modules from its ranking, or type module names under Parameters "
            "(names look like `blocks.3.mlp.down`). With none picked, the swap takes the top K."
        )
        return
    by_name = {m["name"]: m for m in ranking}
    st.multiselect(
        "Swap these modules instead of the top K",
        list(by_name),
        key=PICK_KEY,
        on_change=_picked_to_param,
        format_func=lambda n: f"{n} · {by_name[n]['kind']} · score {by_name[n]['score']:.3g}",
        placeholder="top K from the ranking",
        help="Listed in T7's order (best first). Fills the Modules parameter.",
    )


def swap_details(envelope: dict) -> None:
    """Under a finished swap: where to look next, and the transplant's one-click actions."""
    r = envelope["result"]
    run_id = last_job_id("swap")  # tool_panel shows the last swap job of this session
    if r.get("tir_note") or r.get("recovery_note"):
        st.caption(" · ".join(n for n in (r.get("tir_note"), r.get("recovery_note")) if n))
    if run_id:
        st.session_state[COMPARE_RUN] = run_id
        st.page_link("pages/compare.py", label="Compare T, T′ and D side by side", icon=":material/compare:")
        transplant_actions(run_id, envelope, where="transplant")


st.title("Transplant")
st.markdown(
    "Module transplantation between models of one family: rank the linear modules by how differently "
    "the donor computes them (T7), copy the top K (or your pick) into a working copy of the target and "
    "measure T, T′ and D (T11), or sweep K to see where knowledge moves and what it costs (T8). "
    "The cached target is never written; every run is in **Runs**."
)

with st.container(border=True):
    tool_panel(
        "rank-modules",
        how_to_read="bars are modules ranked by how much the donor's output differs from the "
        "target's on the workload, coloured attention / MLP; the strip shows where in "
        "depth they sit.",
    )
with st.container(border=True):
    tool_panel(
        "swap",
        before_run=module_picker,
        how_to_read="T (target), T′ (transplanted) and D (donor) on the concept facts, the retained "
        "set and the held-out questions; TIR = S(T′)/S(T), Recovery = share of D's "
        "advantage moved.",
        details=swap_details,
    )
with st.container(border=True):
    tool_panel(
        "sweep-k",
        how_to_read="TIR and Recovery should rise with K while retained perplexity stays flat; "
        "the best K is where they part.",
    )
