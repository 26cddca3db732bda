"""Runs: the run history; reopen a run's figure, parameters, error or JSON, or delete it."""

import json
from datetime import datetime

import streamlit as st

from ui.entry import require_app_entry  # streamlit only: light

# Outside app.py's router (a fresh server's first run, an AppTest of this file) app.py runs in
# this page's place, before the engine is imported here (the imports below are after it on purpose).
require_app_entry()

from engine.api import all_tools  # noqa: E402
from ui.jobs import file_stem, result_view  # noqa: E402
from ui.state import job_runner, one_line, startup_notes  # noqa: E402
from ui.text import md
from viz.report import build_report  # noqa: E402

STATUS_BADGES = {
    "done": ":green-badge[done]",
    "failed": ":red-badge[failed]",
    "cancelled": ":gray-badge[cancelled]",
    "running": ":blue-badge[running]",
    "queued": ":blue-badge[queued]",
}
ALL = "All tools"


def when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "—"


def who(name: str | None) -> str:
    """A run's donor or target as shown; a tool that reads an organ or a run records none."""
    return name or "—"


def run_label(row: dict) -> str:
    pair = f"{who(row['donor'])} → {who(row['target'])}"
    return f"{row['title']} · {pair} · {row['status']} · {when(row['created'])}"


def delete_run(run_id: str) -> None:
    job_runner().history.delete(run_id)
    st.session_state.pop("open_run", None)
    st.toast("Run deleted.", icon=":material/delete:")


st.title("Runs")
history = job_runner().history
for note in startup_notes():
    st.info(f"On start: {md(note)}", icon=":material/cleaning_services:")
# A CLI run killed while this server was up stays 'running' until someone looks: this page does.
for gone in history.reap_orphans():
    st.info(
        f"Run {md(gone['id'])} was marked failed: {md(gone['error'])}.", icon=":material/cleaning_services:"
    )
elsewhere = history.active_elsewhere()
if elsewhere:
    st.caption(
        f"{len(elsewhere)} run(s) are in progress in another Graft process (CLI or another server): "
        + ", ".join(f"{r['title']} (pid {r['owner_pid']})" for r in elsewhere[:5])
    )
tools = {t.name: f"{t.code} {t.title}" for t in all_tools()}
kinds = [ALL] + list(tools) + sorted({r["tool"] for r in history.list(limit=1000)} - set(tools))

left, right = st.columns([2, 1], vertical_alignment="bottom")
tool_filter = left.selectbox(
    "Filter by tool", kinds, key="runs_filter", format_func=lambda k: tools.get(k, k) if k != ALL else k
)
if right.button("Refresh", icon=":material/refresh:"):
    st.rerun()
rows = history.list(limit=500, tool=None if tool_filter == ALL else tool_filter)

if not rows:
    st.info(
        "No runs yet. Run a tool on the Models or Alignment page and it appears here."
        if not history.list(limit=1)
        else f"No {md(tools.get(tool_filter, tool_filter))} runs; pick another tool or all runs.",
        icon=":material/info:",
    )
    st.stop()

table = st.dataframe(
    [
        {
            "tool": r["title"],
            "donor": r["donor"],
            "target": r["target"],
            "status": r["status"],
            "duration (s)": round(r["duration_s"], 2) if r["duration_s"] is not None else None,
            "created": datetime.fromtimestamp(r["created"]),
            "id": r["id"],
        }
        for r in rows
    ],
    hide_index=True,
    column_config={
        "created": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
        "duration (s)": st.column_config.NumberColumn(format="%.2f"),
    },
    on_select="rerun",
    selection_mode="single-row",
    key="runs_table",
)

ids = [r["id"] for r in rows]
by_id = {r["id"]: r for r in rows}
wanted = st.query_params.get("run")
if wanted in by_id and "open_run" not in st.session_state:
    st.session_state["open_run"] = wanted
picked = table.selection.rows if table is not None else []
if picked and picked != st.session_state.get("_runs_picked"):  # a row clicked in the table opens it
    st.session_state["open_run"] = ids[picked[0]]
st.session_state["_runs_picked"] = picked
if st.session_state.get("open_run") not in by_id:
    st.session_state["open_run"] = ids[0]
run_id = st.selectbox("Open a run", ids, key="open_run", format_func=lambda i: run_label(by_id[i]))

run = history.get(run_id)
if run is None:
    st.warning("That run was deleted.")
    st.stop()

with st.container(border=True):
    st.markdown(f"#### {md(run['title'])}  {STATUS_BADGES.get(run['status'], run['status'])}")
    duration = f"{run['duration_s']:.2f} s" if run["duration_s"] is not None else "—"
    st.caption(
        f"donor **{md(who(run['donor']))}** → target **{md(who(run['target']))}** · "
        f"created {when(run['created'])} · "
        f"duration {duration} · from {run['source']} · id `{run['id']}`"
    )
    if run["status"] == "failed":
        st.error(md(one_line(run["error"] or "failed")), icon=":material/error:")
    elif run["status"] == "cancelled":
        st.info(md(one_line(run["error"] or "cancelled")), icon=":material/block:")
    elif run["status"] in ("queued", "running"):
        st.info(
            "Still running; its live progress is on the page that started it.",
            icon=":material/hourglass_top:",
        )

    if run["status"] == "done" and run["result"] is not None:
        if run["tool"] in tools:
            result_view(run["tool"], run["result"], key=f"run-{run['id']}")
        else:
            st.json(run["result"])
            st.download_button(
                "Result JSON",
                data=json.dumps(run["result"], indent=2),
                file_name=f"{file_stem(run['result'])}.json",
                mime="application/json",
                on_click="ignore",
                icon=":material/download:",
            )

    if run["status"] == "done" and ((run["result"] or {}).get("result") or {}).get(
        "card"
    ):  # a transplant run
        st.download_button(
            "Build report",
            data=lambda: build_report(run["id"], history),
            file_name=f"{file_stem(run['result'])}-report.html",
            mime="text/html",
            on_click="ignore",
            key=f"report-{run['id']}",
            icon=":material/summarize:",
            help="One self-contained HTML surgery report (opens offline, prints to PDF).",
        )
    with st.expander("Parameters"):
        st.json(run["params"])
    st.button(
        "Delete this run",
        key="delete-run",
        icon=":material/delete:",
        on_click=delete_run,
        args=(run["id"],),
        disabled=run["status"] in ("queued", "running"),
        help="Removes the run from the history (files it wrote stay on disk).",
    )
