"""Concept: where a concept lives in a donor (T5 cartography, T6 spectra), and the rank-k
conjugation transplant that carries it into a target in other coordinates."""

from typing import Any

import streamlit as st

from ui.entry import require_app_entry  # streamlit only: light

# Outside app.py's router (a fresh server's first run, an AppTest of this file) app.py runs in
# this page's place, before the engine is imported here (the imports below are after it on purpose).
require_app_entry()

from ui.concept import concept_inputs  # noqa: E402
from ui.jobs import tool_panel  # noqa: E402
from ui.state import job_runner, last_job_id  # noqa: E402

CELL_KEY = "concept_cell"


def _last_result(tool: str) -> dict[str, Any] | None:
    jid = last_job_id(tool)
    job = job_runner().get(jid) if jid else None
    return job.result if job is not None and job.status == "done" and job.result else None


def _cell_spectrum(cell: str) -> None:
    import viz.concept as vc

    t6 = _last_result("spectrum")
    if t6 is None:
        st.caption(
            "Run **T6** below once: it computes every module's spectrum from the factors in "
            "milliseconds, and the chosen cell's curve shows here."
        )
        return
    names = {m["name"] for m in t6["result"].get("modules", [])}
    if cell not in names:
        st.caption(f"The last T6 run does not include {cell}: run T6 again for these inputs.")
        return
    st.plotly_chart(vc.spectrum_figure(t6, modules=[cell]), key=f"cell-spectrum-{cell}")


def cartography_details(envelope: dict) -> None:
    """Choose a cell: its numbers and its spectrum (T6)."""
    cells = sorted(envelope["result"].get("cells") or [], key=lambda c: -(c.get("share") or 0))
    if not cells:
        return
    by_name = {c["name"]: c for c in cells}
    if st.session_state.get(CELL_KEY) not in by_name:
        st.session_state[CELL_KEY] = cells[0]["name"]
    name = st.selectbox(
        "Cell (layer · module), largest share first",
        list(by_name),
        key=CELL_KEY,
        format_func=lambda n: f"{n} · share {by_name[n]['share'] or 0:.1%}",
        help="Choose a cell of the heatmap to see its spectrum (T6).",
    )
    c = by_name[name]
    cols = st.columns(4)
    cols[0].metric("Share of ‖dW‖²", f"{(c.get('share') or 0):.2%}", border=True)
    cols[1].metric("‖dW‖_F", f"{(c.get('energy') or 0):.4g}", border=True)
    cols[2].metric("Top singular value", f"{(c.get('top_sv') or 0):.4g}", border=True)
    cols[3].metric(
        "Effective rank",
        f"{(c.get('effective_rank') or 0):.2f}",
        help=f"of rank {c.get('rank')}",
        border=True,
    )
    _cell_spectrum(name)


def spectrum_details(envelope: dict) -> None:
    s = envelope["result"].get("summary") or {}
    if s:
        st.caption(f"Median k at the threshold: {s.get('median_k')} (by kind: {s.get('median_k_by_kind')}).")


def conjugate_details(envelope: dict) -> None:
    """The interference verdict, the maps each module used, and the transplant's one-click actions."""
    import pandas as pd

    from ui.transplant import COMPARE_RUN, transplant_actions

    r = envelope["result"]
    inter = r.get("interference") or {}
    change, loc = inter.get("ppl_change_fraction"), inter.get("locality")
    verdict = (
        f"retained perplexity {inter.get('ppl_before', 0):.3g} → {inter.get('ppl_after', 0):.3g}"
        + (f" ({change:+.1%})" if change is not None else "")
        + (
            f" · locality {loc:.0%} of {inter.get('n_prompts')} retained prompts unchanged"
            if loc is not None
            else ""
        )
    )
    if r.get("rolled_back"):
        st.error(
            f"Rolled back automatically: {r.get('roll_back_reason')}. {verdict}.", icon=":material/undo:"
        )
    else:
        st.success(f"Kept: {verdict}.", icon=":material/check_circle:")
    if r.get("alignment_note"):
        st.caption(r["alignment_note"])
    rows = [
        {
            "module": m["name"],
            "→ target": m.get("target_name") or "—",
            "k": m.get("k"),
            "energy kept": m.get("energy_kept"),
            "input map": (m.get("input") or {}).get("map"),
            "input residual": (m.get("input") or {}).get("heldout_residual"),
            "output map": (m.get("output") or {}).get("map"),
            "output residual": (m.get("output") or {}).get("heldout_residual"),
            "status": m.get("status")
            if m.get("status") == "conjugated"
            else f"{m.get('status')}: {m.get('reason')}",
        }
        for m in r.get("modules") or []
    ]
    with st.expander(f"Per module: the map of each side and its held-out residual ({len(rows)} modules)"):
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    run_id = last_job_id("conjugate")
    if run_id:
        st.session_state[COMPARE_RUN] = run_id
        st.page_link("pages/compare.py", label="Compare T, T′ and D side by side", icon=":material/compare:")
        transplant_actions(run_id, envelope, where="concept")


HOW_TO_READ = {
    "cartography": "each cell is one module of one layer; colour = its share of the update's squared norm "
    "(or the metric picked in the figure's menu). Bright cells are where the concept was written.",
    "spectrum": "each curve is a module's cumulative energy against rank; the diamond is the smallest rank "
    "reaching the threshold (the k a rank-k transplant keeps).",
    "conjugate": "the update is mapped side by side into the target's coordinates, added, checked on the "
    "retained set, and rolled back automatically when retained perplexity worsens past your threshold.",
}

st.title("Concept")
st.markdown(
    "Where does a donor keep what it learnt? A LoRA adapter (or a full fine-tune against its base) is "
    "read from its factors: **T5** maps the update over layers and modules, **T6** gives each module's "
    "spectrum and the rank that keeps most of it. Then **rank-k conjugation** carries the update into "
    "the sidebar's target, even when the target's coordinates differ (a rotated twin, another model)."
)
with st.container(border=True):
    inputs = concept_inputs()
for name, details, which in (
    ("cartography", cartography_details, inputs.analysis),
    ("spectrum", spectrum_details, inputs.analysis),
    ("conjugate", conjugate_details, inputs.transplant),
):
    with st.container(border=True):
        tool_panel(name, how_to_read=HOW_TO_READ[name], details=details, inputs=which)
