"""What the Verdict page needs besides the tool panels: the transplant runs it can check (every
tool with a rebuilder, engine/running/rebuild.py), their labels, and the panel inputs for a chosen run or
for the sidebar pair."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

import streamlit as st

from engine.api import RunOptions, rebuildable_tools
from ui.jobs import PanelInputs, sidebar_inputs
from ui.state import job_runner, selection
from viz import common as vc
from viz.verdict import interference_html, stability_rows

SOURCE_KEY = "verdict_source"
RUN_KEY = "verdict_run"
FROM_RUN = "A finished transplant run"
FROM_PAIR = "A module swap of the sidebar pair"


def transplant_runs(limit: int = 200) -> list[dict[str, Any]]:
    """Finished runs of every operation whose T' can be rebuilt, newest first."""
    hist = job_runner().history
    rows = [
        r for tool in rebuildable_tools() for r in hist.list(limit=limit, tool=tool) if r["status"] == "done"
    ]
    return sorted(rows, key=lambda r: r["created"], reverse=True)[:limit]


def run_label(row: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(row["created"]).strftime("%Y-%m-%d %H:%M")
    return f"{row['tool']} · {row.get('donor') or '?'} → {row.get('target') or '?'} · {when} · {row['id']}"


def run_inputs(run_id: Optional[str], row: Optional[dict[str, Any]] = None) -> PanelInputs:
    """Panel inputs for a run: the run id (the tool rebuilds its models), the sidebar's run options
    (device, batch size) when they parse, else the defaults. ``row`` (its history row) names it."""
    if not run_id:
        return PanelInputs({}, None, ("choose a transplant run first",))
    name = (
        f"run {run_id} ({row['tool']}: {row.get('donor') or '?'} → {row.get('target') or '?'})"
        if row
        else f"run {run_id}"
    )
    return PanelInputs({"run": run_id}, selection().options or RunOptions(), name=name)


def choose_inputs() -> PanelInputs:
    """The source picker: a run from the history (default) or the sidebar pair."""
    runs = transplant_runs()
    source = (
        st.segmented_control(
            "Check",
            (FROM_RUN, FROM_PAIR),
            key=SOURCE_KEY,
            default=FROM_RUN,
            help="A run from the history is rebuilt (its weight hashes are checked); the "
            "sidebar pair gets a module swap made for the check, with the K / modules "
            "parameters below.",
        )
        or FROM_RUN
    )
    if source == FROM_PAIR:
        return sidebar_inputs()
    if not runs:
        st.info(
            "No finished transplant yet: run **T11 Module swap** on the Transplant page (or the "
            "conjugation on "
            "the Concept page), or check a module swap of the sidebar pair.",
            icon=":material/info:",
        )
        return run_inputs(None)
    by_id = {r["id"]: r for r in runs}
    if st.session_state.get(RUN_KEY) not in by_id:
        st.session_state[RUN_KEY] = runs[0]["id"]
    run_id = st.selectbox(
        "Transplant run", list(by_id), key=RUN_KEY, format_func=lambda i: run_label(by_id[i])
    )
    return run_inputs(run_id, by_id[run_id])


def interference_details(envelope: dict[str, Any]) -> None:
    """Under T12's figure: the stability checks, then the worst-hit and changed-prompt tables."""
    r = envelope["result"]
    for row in stability_rows(r):
        (st.success if row["passed"] else st.error)(
            f"{vc.CHECK if row['passed'] else vc.CROSS} {row['check']}: {row['detail']}"
        )
    sets = [k for k in ("retained", "extra") if r.get(k)]
    which = (
        st.segmented_control(
            "Texts",
            sets,
            key="verdict_t12_set",
            default=sets[0],
            format_func=lambda k: {"retained": "retained set", "extra": "your texts"}[k],
        )
        or sets[0]
    )
    st.html(interference_html(envelope, which))


def attribution_details(envelope: dict[str, Any]) -> None:
    """Under T13's figure: how it was computed, and whether every layer converged."""
    r = envelope["result"]
    secs = (envelope.get("meta") or {}).get("attribution_seconds") or {}
    rel = r.get("max_rel_delta")
    st.caption(
        f"captum LayerIntegratedGradients ({r.get('method')}), {r.get('steps')} steps doubled per layer up "
        f"to {r.get('max_steps')}; baseline: {r.get('baseline_text') or r.get('baseline')}; largest "
        "|convergence "
        f"delta| {vc.fmt_num(r.get('max_abs_delta'), 4)}"
        + (f", {vc.fmt_num(rel, 3)} of |F(x) − F(baseline)|" if rel is not None else "")
        + (" · seconds: " + ", ".join(f"{k} {v:g}" for k, v in secs.items()) if secs else "")
    )
    flagged = {k: v for k, v in (r.get("unreliable") or {}).items() if v}
    if flagged:
        st.warning(
            "Not converged within the tolerance (read these rows with care): "
            + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in flagged.items()),
            icon=":material/warning:",
        )
    else:
        st.caption(
            f"{vc.CHECK} every layer of every model converged within the tolerance "
            f"({vc.fmt_num(r.get('tolerance'), 3)} of |F(x) − F(baseline)|)."
        )
