"""The generic "run a tool" panel and the views of a job: live progress, error, or result.

A page calls :func:`tool_panel` with a registered tool's name. The panel shows widgets built from
the tool's parameters, a Run button that submits a background job, and then, for the last job of
that tool in this session, either a polling fragment (progress bar, message, Cancel) or the
finished result (figure, key numbers, downloads). The page itself never waits for a job.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional

import streamlit as st

from engine.errors import GraftError
from engine.jobs import Job
from engine.params import build_params
from engine.registry import Tool, get_tool
from ui.state import graft_error, job_runner, last_job_id, one_line, remember_job, selection
from ui.widgets import label_for, param_widgets

POLL_SECONDS = 0.75

# Nicer names for well-known result numbers; any other top-level number is shown generically.
METRIC_LABELS: dict[str, str] = {
    "mean_matched_cka": "Mean matched CKA",
    "mean_alignment": "Mean alignment (1 − held-out residual)",
    "tokenizer_overlap": "Tokenizer overlap (Jaccard)",
    "swappable_modules": "Swappable modules",
    "shared_modules": "Modules shared by name",
    "n_rows": "Aligned rows",
    "n_fit": "Fit rows",
    "n_heldout": "Held-out rows",
    "threshold": "Epsilon threshold",
}
MAX_METRICS = 4

ResultDetails = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- the panel
def tool_panel(tool_name: str, *, how_to_read: str = "", details: Optional[ResultDetails] = None) -> None:
    """Parameters, Run button and the last job's view for one registered tool."""
    tool = get_tool(tool_name)
    st.subheader(f"{tool.code} · {tool.title}", anchor=tool.name)
    st.caption(tool.summary + (f"  \n**How to read it:** {how_to_read}" if how_to_read else ""))

    values: dict[str, Any] = {}
    if _has_params(tool):
        with st.expander("Parameters", expanded=False):
            values = param_widgets(tool.params_cls, key_prefix=f"param-{tool.name}")

    sel = selection()
    clicked = st.button(
        f"Run {tool.code}", key=f"run-{tool.name}", type="primary", icon=":material/play_arrow:",
        disabled=not sel.ok, help=None if sel.ok else "Fix the model choice in the sidebar first.",
    )
    if clicked:
        _submit_tool(tool, values)

    job_id = last_job_id(tool.name)
    if job_id:
        job_view(job_id, tool_name=tool.name, details=details)
    elif not sel.ok:
        st.info("Choose a valid donor and target in the sidebar to run this tool.", icon=":material/info:")


def _has_params(tool: Tool) -> bool:
    import dataclasses

    return bool(dataclasses.fields(tool.params_cls))


def _submit_tool(tool: Tool, values: dict[str, Any]) -> None:
    sel = selection()
    try:
        params = build_params(tool.params_cls, values)
        job = job_runner().submit_tool(tool.name, sel.donor, sel.target, sel.options, params)
    except GraftError as exc:
        st.error(one_line(exc), icon=":material/error:")
        return
    remember_job(tool.name, job)


# --------------------------------------------------------------------------- one job
def job_view(job_id: str, *, tool_name: Optional[str] = None, details: Optional[ResultDetails] = None,
             on_done: Optional[ResultDetails] = None) -> None:
    """Live progress while a job runs, then its result, error or cancellation.

    ``tool_name`` set: a finished job shows the tool's figure, key numbers and downloads.
    ``on_done`` (for generic jobs) renders a finished job's result dict instead.
    """
    job = job_runner().get(job_id)
    if job is None:
        _stored_run_view(job_id, tool_name, details)
        return
    if not job.done:
        _live_job(job_id)
        return
    _finished_job_view(job, tool_name, details, on_done)


@st.fragment(run_every=POLL_SECONDS)
def _live_job(job_id: str) -> None:
    """Polls the job; when it ends, reruns the whole page so the result is drawn once, statically."""
    job = job_runner().get(job_id)
    if job is None or job.done:
        st.rerun(scope="app")
        return
    with st.container(border=True):
        label = "Queued — waiting for the job before it" if job.status == "queued" else job.message or "running"
        st.progress(min(max(job.progress, 0.0), 1.0), text=f"**{job.title}** · {label}")
        left, right = st.columns([4, 1], vertical_alignment="center")
        left.caption(f"{job.donor} → {job.target} · {job.elapsed():.1f} s · job {job.id}")
        cancelling = job.cancel_event.is_set()
        if right.button("Cancelling…" if cancelling else "Cancel", key=f"cancel-{job.id}",
                        icon=":material/stop_circle:", disabled=cancelling, width="stretch"):
            job_runner().cancel(job.id)


def _finished_job_view(job: Job, tool_name: Optional[str], details: Optional[ResultDetails],
                       on_done: Optional[ResultDetails]) -> None:
    if job.status == "failed":
        st.error(f"{job.title} failed: {one_line(job.error)}", icon=":material/error:")
        return
    if job.status == "cancelled":
        st.info(f"{job.title} was cancelled after {job.elapsed():.1f} s.", icon=":material/block:")
        return
    if tool_name and job.result is not None:
        result_view(tool_name, job.result, key=job.id, details=details)
    elif on_done is not None and job.result is not None:
        on_done(job.result)


def _stored_run_view(run_id: str, tool_name: Optional[str], details: Optional[ResultDetails]) -> None:
    """The job is gone from memory (the server restarted): fall back to the run history."""
    row = job_runner().history.get(run_id)
    if row is None:
        return
    if row["status"] == "done" and row["result"] and tool_name:
        result_view(tool_name, row["result"], key=run_id, details=details)
    elif row["status"] in ("failed", "cancelled"):
        st.error(f"{row['title']} {row['status']}: {one_line(row['error'] or row['status'])}", icon=":material/error:")


# --------------------------------------------------------------------------- one result
def result_view(tool_name: str, envelope: dict[str, Any], *, key: str,
                details: Optional[ResultDetails] = None) -> None:
    """Figure, key numbers, optional tool-specific details, and JSON / HTML downloads."""
    import viz

    fig = None
    try:
        fig = viz.figure_for(tool_name, envelope)
    except GraftError as exc:
        st.error(one_line(exc), icon=":material/error:")
    except Exception as exc:  # a figure bug must not hide the numbers or the downloads
        st.warning(f"The figure could not be drawn ({graft_error(exc)}); the numbers are below.",
                   icon=":material/warning:")
    if fig is not None:
        st.plotly_chart(fig, config=viz.download_config(fig), key=f"fig-{tool_name}-{key}")

    metrics = key_numbers(envelope)
    if metrics:
        cols = st.columns(len(metrics))
        for col, (label, value) in zip(cols, metrics):
            col.metric(label, value, border=True)
    st.caption(run_caption(envelope))
    if details is not None:
        details(envelope)

    stem = file_stem(envelope)
    left, right, _ = st.columns([1, 1, 2])
    left.download_button(
        "Result JSON", data=json.dumps(envelope, indent=2), file_name=f"{stem}.json", mime="application/json",
        key=f"dl-json-{tool_name}-{key}", icon=":material/download:", on_click="ignore", width="stretch",
    )
    if fig is not None:
        right.download_button(
            "Figure HTML", data=lambda: viz.figure_html(fig), file_name=f"{stem}.html", mime="text/html",
            key=f"dl-html-{tool_name}-{key}", icon=":material/download:", on_click="ignore", width="stretch",
            help="A standalone page with the interactive figure; works offline.",
        )


def key_numbers(envelope: dict[str, Any]) -> list[tuple[str, str]]:
    """Up to four headline numbers of a result: the well-known ones first, then any other scalar."""
    result = envelope.get("result") or {}
    numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    ordered = [k for k in METRIC_LABELS if k in numbers] + [k for k in numbers if k not in METRIC_LABELS]
    out = []
    for name in ordered[:MAX_METRICS]:
        v = numbers[name]
        out.append((METRIC_LABELS.get(name, label_for(name)), f"{v:,}" if isinstance(v, int) else f"{v:.3f}"))
    return out


def run_caption(envelope: dict[str, Any]) -> str:
    meta = envelope.get("meta") or {}
    parts = [f"donor **{envelope.get('donor', '?')}** → target **{envelope.get('target', '?')}**"]
    wl = meta.get("workload") or {}
    if wl:
        parts.append(f"workload {wl.get('name', '?')} ({wl.get('n_texts', '?')} texts)")
    if "compute_seconds" in meta:
        parts.append(f"{meta.get('load_seconds', 0) + meta['compute_seconds']:.2f} s on {meta.get('device', '?')}")
    return " · ".join(parts)


def file_stem(envelope: dict[str, Any]) -> str:
    name = lambda s: str(s or "").rstrip("/").rsplit("/", 1)[-1]  # noqa: E731
    raw = f"graft-{envelope.get('tool', 'result')}-{name(envelope.get('donor'))}-vs-{name(envelope.get('target'))}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", raw).strip("-.")
