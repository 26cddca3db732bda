"""Go / no-go figure: one table row per transplant operation (verdict, settings, reasons, evidence),
and the per-layer maps the conjugation line would use. Reads the result; computes nothing."""

from __future__ import annotations

import html
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import common as c


def settings_text(op: dict[str, Any]) -> str:
    """The settings of one operation line in words (no numbers are made here, only formatted)."""
    s = op.get("settings") or {}
    if not op.get("go"):
        return "—"
    if op.get("operation") == "module_swap":
        share = s.get("score_share")
        return f"K = {s.get('k')}" + (f" ({share:.0%} of the T7 score)" if c.is_number(share) else "")
    if op.get("operation") == "organ":
        pos = ", ".join(str(p) for p in s.get("positions") or [])
        return (
            f"{s.get('mode')}: donor blocks "
            f"{s.get('organ_start')}..{s.get('organ_start', 0) + s.get('organ_length', 1) - 1}"
            f" at target block(s) {pos}"
        )
    parts = [
        "maps: identity (plain merge)"
        if s.get("plain_merge_advised")
        else "maps: fitted (auto), no plain merge"
    ]
    if s.get("k_median") is not None:
        parts.append(f"rank k = {c.fmt_value(s.get('k_median'))} (max {c.fmt_value(s.get('k_max'))})")
    return "; ".join(parts)


def evidence_lines(op: dict[str, Any]) -> list[str]:
    return [
        f"{e.get('check')} {e.get('label')}: {c.fmt_value(e.get('value'))}" for e in op.get("evidence") or []
    ]


def gonogo_figure(envelope: dict) -> go.Figure:
    r = c.result_of(envelope)
    ops = r.get("operations") or []
    conj = next((o for o in ops if o.get("operation") == "conjugation"), {})
    layers = (conj.get("settings") or {}).get("layers") or []
    fig = make_subplots(
        rows=2,
        cols=1,
        specs=[[{"type": "table"}], [{"type": "xy"}]],
        row_heights=[0.62, 0.38],
        vertical_spacing=0.1,
        subplot_titles=("Recommendation per operation", "Best linear map per matched layer (T3, held-out)"),
    )
    verdict = [("✓ go" if o.get("go") else "✗ no-go") for o in ops]
    fill = [c.GOOD_FILL if o.get("go") else c.BAD_FILL for o in ops]
    colour = [c.GOOD if o.get("go") else c.BAD for o in ops]
    fig.add_trace(
        go.Table(
            columnwidth=[1.1, 0.8, 1.8, 4.4, 3.2],
            header=dict(
                values=[
                    "<b>operation</b>",
                    "<b>verdict</b>",
                    "<b>settings</b>",
                    "<b>why</b>",
                    "<b>evidence</b>",
                ],
                fill_color=c.HEADER_FILL,
                align="left",
                font=dict(size=13),
                height=30,
            ),
            cells=dict(
                values=[
                    [o.get("title") for o in ops],
                    verdict,
                    [html.escape(settings_text(o)) for o in ops],
                    ["<br>".join("• " + html.escape(x) for x in o.get("reasons") or []) for o in ops],
                    ["<br>".join(html.escape(x) for x in evidence_lines(o)) for o in ops],
                ],
                fill_color=[fill, fill, ["white"] * len(ops), ["white"] * len(ops), ["white"] * len(ops)],
                font=dict(size=11, color=[colour, colour] + [["#222222"] * len(ops)] * 3),
                align="left",
                height=28,
            ),
        ),
        row=1,
        col=1,
    )
    maps = ("identity", "procrustes", "ridge")
    for i, name in enumerate(maps):
        pts = [l for l in layers if l.get("map") == name]
        fig.add_trace(
            go.Bar(
                x=[f"{l.get('donor_layer')}→{l.get('target_layer')}" for l in pts],
                y=[l.get("alignment") for l in pts],
                name=f"{name} map",
                marker_color=c.SERIES[i],
                hovertemplate="layers %{x}<br>Procrustes alignment %{y:.3f}<extra>" + name + "</extra>",
            ),
            row=2,
            col=1,
        )
    if not layers:
        fig.add_trace(go.Bar(x=[], y=[], name="no matched layers"), row=2, col=1)
    fig.update_yaxes(title_text="1 − held-out residual", range=[0, 1.05], row=2, col=1)
    fig.update_xaxes(title_text="donor layer → target layer", type="category", row=2, col=1)
    c.apply_layout(
        fig,
        c.envelope_title(envelope, "OP0", "Go / no-go"),
        html.escape(str(r.get("recommendation") or "").split(". ")[0])[:140],
        height=760,
        filename=c.download_filename(envelope, "OP0", "gonogo"),
        barmode="overlay",
        legend=dict(orientation="h", y=0.36, x=0),
    )
    return fig
