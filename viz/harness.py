"""T14 lm-evaluation-harness figure: every task's metrics for T and T′ side by side, with the
harness's standard errors as error bars. Computes nothing: the numbers are the result's."""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import common as c

_LABELS = {"T": ("T (target)", c.TARGET), "T′": ("T′ (transplanted)", c.TRANSPLANTED)}


def panels(r: dict) -> list[tuple[str, str]]:
    """(task, metric) of every number the result holds, in task order (standard errors excluded)."""
    out: list[tuple[str, str]] = []
    models = r.get("models") or {}
    for task in r.get("tasks") or []:
        names: list[str] = []
        for m in models.values():
            for name in m.get(task) or {}:
                if not name.endswith("_stderr") and name not in names:
                    names.append(name)
        out.extend((task, name) for name in names)
    return out


def harness_figure(envelope: dict) -> go.Figure:
    r = c.result_of(envelope)
    cells = panels(r)
    src = r.get("source") or {}
    # a run-based tool's envelope names no models: the transplant it judged does
    named = {**envelope, "donor": envelope.get("donor") or src.get("donor"),
             "target": envelope.get("target") or src.get("target")}  # fmt: skip
    title = c.envelope_title(named, "T14", "lm-evaluation-harness")
    name = c.download_filename(named, "T14", "lm-eval")
    if not cells:
        fig = go.Figure()
        c.note(fig, "no metrics in this result", y=0.5)
        return c.apply_layout(fig, title, filename=name)
    cols = min(3, len(cells))
    rows = math.ceil(len(cells) / cols)
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=[f"{t}<br>{m}" for t, m in cells], vertical_spacing=0.3 / rows
    )
    models = r.get("models") or {}
    for k, (task, metric) in enumerate(cells):
        row, col = k // cols + 1, k % cols + 1
        for key, (label, colour) in _LABELS.items():
            vals = (models.get(key) or {}).get(task) or {}
            v, se = vals.get(metric), vals.get(f"{metric}_stderr")
            fig.add_trace(
                go.Bar(
                    x=[key],
                    y=[v if c.is_number(v) else None],
                    error_y=dict(type="data", array=[se if c.is_number(se) else 0], visible=c.is_number(se)),
                    name=label,
                    legendgroup=key,
                    showlegend=k == 0,
                    marker_color=colour,
                    hovertemplate=f"{label}<br>{metric}: %{{y:.4g}}"
                    + (f" ± {c.fmt_num(se, 4)}" if c.is_number(se) else "")
                    + "<extra></extra>",
                ),
                row=row,
                col=col,
            )
    sub = (
        f"run {src.get('run_id') or '—'} ({src.get('operation') or src.get('tool') or '—'}); concept set "
        f"{r.get('concept', '—')}, retained set {r.get('retained', '—')}; "
        f"lm-eval {r.get('harness_version', '—')}; error bars: the harness's standard errors"
    )
    return c.apply_layout(
        fig, title, sub, height=260 * rows + 160, filename=name, barmode="group", margin=dict(t=150)
    )
