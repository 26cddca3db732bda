"""The generic "run a tool" panel and the views of a job: live progress, error, or result.

A page calls :func:`tool_panel` with a registered tool's name. The panel shows widgets built from
the tool's parameters, a Run button that submits a background job, and then, for the last job of
that tool in this session, either a polling fragment (progress bar, message, Cancel) or the
finished result (figure, key numbers, downloads). The page itself never waits for a job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import streamlit as st

from engine.api import (
    GraftError,
    Job,
    ModelSpec,
    RunOptions,
    build_params,
    get_tool,
    jsonsafe,
    pair_labels,
    param_specs,
)
from ui.state import graft_error, job_runner, last_job_id, one_line, remember_job, selection
from ui.text import md
from ui.widgets import label_for, param_widgets

POLL_SECONDS = 0.75

# Headline numbers of well-known results: field -> (label, tooltip). A list field counts its items.
# A result with none of these shows its first few top-level numbers instead.
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "mean_matched_cka": ("Mean matched CKA", "Mean CKA along the monotone layer matching (0..1)."),
    "mean_alignment": ("Mean Procrustes alignment", "Mean over matched layers of 1 − held-out T3 residual."),
    "tokenizer_overlap": ("Tokenizer overlap", "Jaccard overlap of the two vocabularies' token strings."),
    "swappable_modules": ("Swappable modules", "Modules shared by name whose weight shapes are equal."),
    "shared_modules": (
        "Modules shared by name",
        "Linear modules present in both models under the same name.",
    ),
    "plausible_direct": (
        "Direct-insertion pairs",
        "Donor/target positions (s, p) where raw epsilon is below the threshold.",
    ),
    "n_rows": ("Aligned rows", "Token (or word) positions compared between the two models."),
    "n_fit": ("Fit rows", "Rows the maps were fitted on."),
    "n_heldout": ("Held-out rows", "Rows the residuals and cosines were measured on."),
    "k": ("Modules swapped", "Donor modules copied into the working copy of the target."),
    "tir": ("TIR", "Transplant improvement ratio S(T′)/S(T) under the run's score kind (see the caption)."),
    "recovery": ("Recovery", "(S(T′) − S(T)) / (S(D) − S(T)): share of the donor's advantage that moved."),
    "alignment_after": (
        "Alignment score T′ vs D",
        "Share of positions where T′'s greedy next token (word, across tokenizers) equals D's.",
    ),
    "n_swappable": ("Swappable modules", "Modules shared by name whose weight shapes are equal."),
}
MAX_METRICS = 4

ResultDetails = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- the panel
def tool_panel(
    tool_name: str,
    *,
    how_to_read: str = "",
    details: Optional[ResultDetails] = None,
    before_run: Optional[Callable[[], None]] = None,
    inputs: Optional["PanelInputs"] = None,
) -> None:
    """Parameters, Run button and the last job's view for one registered tool.

    ``before_run`` draws extra inputs between the parameters and the Run button. ``inputs`` are the
    models the page resolved for this tool (default: the sidebar's donor and target)."""
    tool = get_tool(tool_name)
    st.subheader(f"{tool.code} · {tool.title}", anchor=tool.name)
    st.caption(tool.summary + (f"  \n**How to read it:** {how_to_read}" if how_to_read else ""))

    if param_specs(tool.params_cls):
        with st.expander("Parameters", expanded=False):
            param_widgets(tool.params_cls, key_prefix=_param_prefix(tool.name))
    if before_run is not None:
        before_run()

    inputs = inputs or sidebar_inputs()
    job_id = last_job_id(tool.name)
    job = job_runner().get(job_id) if job_id else None
    busy = job is not None and not job.done
    # Submitted in the script run, not in an on_click callback: a callback runs before the sidebar
    # and would read the selection of the previous run, so the pair submitted could differ from
    # the pair on the screen. Here the sidebar (and the page's own inputs) resolved this run's widgets.
    if st.button(
        tool.run_label or f"Run {tool.code}",
        key=f"run-{tool.name}",
        type="primary",
        icon=":material/play_arrow:",
        disabled=not inputs.ok or busy,
        help=(inputs.errors[0] if inputs.errors else "Choose the inputs first.")
        if not inputs.ok
        else "This tool is already running; cancel it or wait."
        if busy
        else f"Runs {tool.code} on {inputs.label} in the background.",
    ):
        job_id = _submit_tool(tool.name, inputs) or job_id
    submit_error = st.session_state.pop(f"_submit_error-{tool.name}", None)
    if submit_error:
        st.error(md(submit_error), icon=":material/error:")

    if job_id:
        job_view(job_id, tool_name=tool.name, details=details, current=inputs)
    elif not inputs.ok:
        st.info(
            md(inputs.errors[0])
            if inputs.errors
            else "Choose a valid donor and target in the sidebar to run this tool.",
            icon=":material/info:",
        )


@dataclass(frozen=True)
class PanelInputs:
    """The models (and adapter) a tool panel runs on, resolved in this script run."""

    models: dict[str, Any]  # "donor" | "target" | "base" -> ModelSpec; "adapter" / "run" -> text
    options: Optional[RunOptions]
    errors: tuple[str, ...] = ()
    name: str = ""  # how the inputs read in a sentence when they are not a pair (a run from the history)

    @property
    def ok(self) -> bool:
        return not self.errors and self.options is not None and bool(self.models)

    @property
    def refs(self) -> dict[str, str]:
        return {k: (v.ref if isinstance(v, ModelSpec) else str(v)) for k, v in self.models.items() if v}

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if "run" in self.refs:
            return f"run {self.refs['run']}"
        src, dst = pair_labels(self.refs)
        return f"{src} → {dst}" if src and dst else (src or dst or "the chosen inputs")


def sidebar_inputs() -> PanelInputs:
    """Donor and target as the sidebar resolved them in this run."""
    sel = selection()
    models = (
        {"donor": sel.donor, "target": sel.target} if sel.donor is not None and sel.target is not None else {}
    )
    return PanelInputs(models, sel.options, tuple(sel.errors) if not sel.ok else ())


def _param_prefix(tool_name: str) -> str:
    return f"param-{tool_name}"


def _submit_tool(tool_name: str, inputs: PanelInputs) -> Optional[str]:
    """Submit the tool on the inputs resolved in this very run; returns the job id."""
    tool = get_tool(tool_name)
    prefix = _param_prefix(tool.name)
    values = {
        s.name: st.session_state.get(f"{prefix}-{s.name}", s.default) for s in param_specs(tool.params_cls)
    }
    try:
        if not inputs.ok:
            raise GraftError(inputs.errors[0] if inputs.errors else "choose the inputs first")
        params = build_params(tool.params_cls, values)
        m = inputs.models
        job = job_runner().submit_tool(
            tool.name,
            m.get("donor"),
            m.get("target"),
            inputs.options,
            params,
            base=m.get("base"),
            adapter=m.get("adapter"),
            organ=m.get("organ"),
            run=m.get("run"),
        )
    except GraftError as exc:
        st.session_state[f"_submit_error-{tool.name}"] = one_line(exc)
        return None
    remember_job(tool.name, job)
    return job.id


def inputs_mismatch(envelope: dict[str, Any], current: Optional[PanelInputs]) -> Optional[str]:
    """A one-line warning when a result was computed on other inputs than those on the screen now."""
    if current is None or not current.models:
        return None
    now = current.refs
    then = {k: envelope.get(k) for k in now}
    if all(then[k] == now[k] for k in now):
        return None
    src, dst = pair_labels(
        {
            k: v
            for k, v in envelope.items()
            if k in ("donor", "target", "base", "adapter", "organ", "run") and v
        }
    )
    return (
        f"This result is for **{md(src)} → {md(dst)}**, not for the models on the screen "
        f"(**{md(current.label)}**). Run again for the models on the screen."
    )


# --------------------------------------------------------------------------- one job
def job_view(
    job_id: str,
    *,
    tool_name: Optional[str] = None,
    details: Optional[ResultDetails] = None,
    on_done: Optional[ResultDetails] = None,
    where: str = "main",
    current: Optional[PanelInputs] = None,
) -> None:
    """Live progress while a job runs, then its result, error or cancellation.

    ``tool_name`` set: a finished job shows the tool's figure, key numbers and downloads.
    ``on_done`` (for generic jobs) renders a finished job's result dict instead.
    ``where`` keeps widget keys unique when one job is shown in two places (page and sidebar).
    """
    job = job_runner().get(job_id)
    if job is None:
        _stored_run_view(job_id, tool_name, details, current)
        return
    if not job.done:
        _live_job(job_id, where)
        return
    _finished_job_view(job, tool_name, details, on_done, current)


@st.fragment(run_every=POLL_SECONDS)
def _live_job(job_id: str, where: str) -> None:
    """Polls the job; when it ends, reruns the whole page so the result is drawn once, statically."""
    job = job_runner().get(job_id)
    if job is None or job.done:
        st.rerun(scope="app")
        return
    with st.container(border=True):
        label = (
            "Queued — waiting for the job before it" if job.status == "queued" else job.message or "running"
        )
        st.progress(min(max(job.progress, 0.0), 1.0), text=f"**{md(job.title)}** · {md(label)}")
        left, right = st.columns([4, 1], vertical_alignment="center")
        left.caption(f"{md(job.donor)} → {md(job.target)} · {job.elapsed():.1f} s · job {md(job.id)}")
        cancelling = job.cancel_event.is_set()
        if right.button(
            "Cancelling…" if cancelling else "Cancel",
            key=f"cancel-{where}-{job.id}",
            icon=":material/stop_circle:",
            disabled=cancelling,
            width="stretch",
        ):
            job_runner().cancel(job.id)


def _finished_job_view(
    job: Job,
    tool_name: Optional[str],
    details: Optional[ResultDetails],
    on_done: Optional[ResultDetails],
    current: Optional[PanelInputs] = None,
) -> None:
    if job.status == "failed":
        st.error(md(f"{job.title} failed: {one_line(job.error)}"), icon=":material/error:")
        return
    if job.status == "cancelled":
        st.info(md(f"{job.title} was cancelled after {job.elapsed():.1f} s."), icon=":material/block:")
        return
    if tool_name and job.result is not None:
        _guarded_result(tool_name, job.result, key=job.id, details=details, current=current)
    elif on_done is not None and job.result is not None:
        on_done(job.result)


def _stored_run_view(
    run_id: str,
    tool_name: Optional[str],
    details: Optional[ResultDetails],
    current: Optional[PanelInputs] = None,
) -> None:
    """The job is gone from memory (the server restarted): fall back to the run history."""
    row = job_runner().history.get(run_id)
    if row is None:
        return
    if row["status"] == "done" and row["result"] and tool_name:
        _guarded_result(tool_name, row["result"], key=run_id, details=details, current=current)
    elif row["status"] in ("failed", "cancelled"):
        st.error(
            md(f"{row['title']} {row['status']}: {one_line(row['error'] or row['status'])}"),
            icon=":material/error:",
        )


def _guarded_result(
    tool_name: str,
    envelope: dict[str, Any],
    *,
    key: str,
    details: Optional[ResultDetails] = None,
    current: Optional[PanelInputs] = None,
) -> None:
    """The result, unless it is for other models than those on the screen: then a warning, and
    the result only on request, so no figure is taken for the models on the screen by mistake."""
    warning = inputs_mismatch(envelope, current)
    if warning is None:
        result_view(tool_name, envelope, key=key, details=details)
        return
    st.warning(warning, icon=":material/warning:")  # markdown: its model names are escaped (inputs_mismatch)
    with st.expander("Show that result anyway"):
        result_view(tool_name, envelope, key=key, details=details)


# --------------------------------------------------------------------------- one result
def result_view(
    tool_name: str, envelope: dict[str, Any], *, key: str, details: Optional[ResultDetails] = None
) -> None:
    """Figure, key numbers, optional tool-specific details, and JSON / HTML downloads."""
    import viz

    fig = None
    try:
        fig = viz.figure_for(tool_name, envelope)
    except GraftError as exc:
        st.error(md(one_line(exc)), icon=":material/error:")
    except Exception as exc:  # a figure bug must not hide the numbers or the downloads
        st.warning(
            f"The figure could not be drawn ({md(graft_error(exc))}); the numbers are below.",
            icon=":material/warning:",
        )
    for w in (envelope.get("result") or {}).get("warnings") or []:
        st.warning(md(w), icon=":material/warning:")
    if fig is not None:
        st.plotly_chart(fig, config=viz.download_config(fig), key=f"fig-{tool_name}-{key}")
    for n in (envelope.get("meta") or {}).get("notes") or []:
        st.caption(f"Note: {md(n)}")

    metrics = key_numbers(envelope)
    if metrics:
        cols = st.columns(len(metrics))
        for col, (label, value, help_text) in zip(cols, metrics):
            col.metric(label, value, help=help_text or None, border=True)
    st.caption(run_caption(envelope))
    if details is not None:
        details(envelope)

    stem = file_stem(envelope)
    left, right, _ = st.columns([1, 1, 2])
    left.download_button(
        "Result JSON",
        data=jsonsafe.dumps(envelope, indent=2),
        file_name=f"{stem}.json",
        mime="application/json",
        key=f"dl-json-{tool_name}-{key}",
        icon=":material/download:",
        on_click="ignore",
        width="stretch",
    )
    if fig is not None:
        right.download_button(
            "Figure HTML",
            data=lambda: viz.figure_html(fig),
            file_name=f"{stem}.html",
            mime="text/html",
            key=f"dl-html-{tool_name}-{key}",
            icon=":material/download:",
            on_click="ignore",
            width="stretch",
            help="A standalone page with the interactive figure; works offline.",
        )


def key_numbers(envelope: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Up to four headline numbers of a result as (label, value, tooltip)."""
    result = envelope.get("result") or {}
    out: list[tuple[str, str, str]] = []
    for name, (label, help_text) in METRIC_LABELS.items():
        v = result.get(name)
        if isinstance(v, list):
            v = len(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append((label, _fmt(v), _exact(v, help_text)))
    if not out:
        out = [
            (label_for(k), _fmt(v), _exact(v, ""))
            for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
    return out[:MAX_METRICS]


def _exact(v: float, help_text: str) -> str:
    """The tile's help, with the exact value when the tile shows it shortened."""
    shown = _fmt(v)
    exact = f"{v:,}" if isinstance(v, int) else repr(float(v))
    return (
        help_text
        if shown in (exact, f"{v:.3f}")
        else (help_text + " " if help_text else "") + f"Exact: {exact}."
    )


def _fmt(v: float) -> str:
    """A metric tile's number, short enough to show whole: 1,234 and 0.123 as they are, 92.1 M for
    92,101,352 (the tile's help keeps the exact value)."""
    a = abs(v)
    if a >= 1e6:
        for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
            if a >= div:
                return f"{v / div:.3g} {unit}"
    if isinstance(v, int):
        return f"{v:,}"
    if a >= 1e4:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:,.1f}"
    if 0 < a < 1e-3:
        return f"{v:.2e}"
    return f"{v:.3f}"


def run_caption(envelope: dict[str, Any]) -> str:
    meta = envelope.get("meta") or {}
    names = [(k, envelope.get(k)) for k in ("run", "adapter", "donor", "base", "target") if envelope.get(k)]
    parts = [" → ".join(f"{k} **{md(v)}**" for k, v in names)] if names else []
    wl = meta.get("workload") or {}
    if wl:
        parts.append(f"workload {md(wl.get('name', '?'))} ({md(wl.get('n_texts', '?'))} texts)")
    if "compute_seconds" in meta:
        parts.append(
            f"{meta.get('load_seconds', 0) + meta['compute_seconds']:.2f} s on {md(meta.get('device', '?'))}"
        )
    return " · ".join(parts)


def file_stem(envelope: dict[str, Any]) -> str:
    name = lambda s: str(s or "").rstrip("/").rsplit("/", 1)[-1]  # noqa: E731
    src, dst = pair_labels(envelope)
    raw = f"graft-{envelope.get('tool', 'result')}-{name(src)}-vs-{name(dst)}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", raw).strip("-.")
