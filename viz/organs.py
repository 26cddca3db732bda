"""Organs page figures: organ extraction, standalone training loss, insertion before/after,
T9 position sensitivity (with T4's epsilon on a second axis) and T10 bridge deviation.

Every number drawn comes from the result dict; nothing is recomputed here.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import common as c

_PPL = (("ppl_concept", "concept perplexity"), ("ppl_retained", "retained perplexity"))


def _empty(fig: go.Figure, text: str) -> None:
    fig.add_annotation(
        text=text,
        xref="paper",
        yref="paper",
        x=0.5,
        y=0.5,
        showarrow=False,
        font=dict(size=14, color=c.MUTED),
    )


def _organ_label(card: dict) -> str:
    layers = card.get("layers") or []
    src = c.display_name((card.get("source") or {}).get("label"), "source")
    span = f"blocks {layers[0]}–{layers[-1]}" if layers else "blocks ?"
    return f"{src} {span}" + (" (trained standalone)" if card.get("training") else "")


def extract_figure(envelope: dict) -> go.Figure:
    """The donor's blocks, the organ's highlighted, with each block's bytes."""
    r = c.result_of(envelope)
    card = r.get("organ") or {}
    n = int(r.get("n_layers") or 0)
    layers = set(card.get("layers") or [])
    per_block = (r.get("bytes") or 0) / max(len(layers), 1)
    fig = go.Figure(
        go.Bar(
            x=list(range(n)),
            y=[per_block / 2**20 if i in layers else 0 for i in range(n)],
            marker_color=[c.TRANSPLANTED if i in layers else c.GRID for i in range(n)],
            hovertemplate="block %{x}<br>%{y:.2f} MiB in the organ<extra></extra>",
            name="organ blocks",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=list(range(n)),
            y=[0] * n,
            mode="markers",
            marker=dict(color=c.MUTED, size=5),
            name="donor blocks",
            hovertemplate="block %{x}<extra></extra>",
        )
    )
    c.apply_layout(
        fig,
        c.envelope_title(envelope, "OP2.1", "Organ extraction"),
        f"{_organ_label(card)} · {r.get('n_tensors', 0)} tensors, "
        f"{c.fmt_num((r.get('bytes') or 0) / 2**20, 3)} MiB"
        f" · reload bit-exact {c.CHECK if r.get('bit_exact_reload') else c.CROSS}",
        height=380,
        filename=c.download_filename(envelope, "OP2.1", "organ_extract"),
    )
    fig.update_xaxes(title_text="donor block", **c.int_axis(list(range(n))))
    fig.update_yaxes(title_text="MiB")
    return fig


def train_figure(envelope: dict) -> go.Figure:
    """Training loss per step of the standalone organ."""
    r = c.result_of(envelope)
    losses = r.get("losses") or []
    fig = go.Figure(
        go.Scatter(
            x=list(range(1, len(losses) + 1)),
            y=losses,
            mode="lines+markers",
            name="LM loss",
            marker=dict(size=4),
            line=dict(color=c.TRANSPLANTED),
            hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>",
        )
    )
    if not losses:
        _empty(fig, "no training step in this result")
    m = r.get("metrics") or {}
    c.apply_layout(
        fig,
        c.envelope_title(envelope, "OP2.2", "Standalone organ training"),
        f"{_organ_label(r.get('organ') or {})} · standalone perplexity "
        f"{c.fmt_num(m.get('standalone_ppl_before'), 4)} → {c.fmt_num(m.get('standalone_ppl_after'), 4)}",
        height=420,
        filename=c.download_filename(envelope, "OP2.2", "organ_train"),
    )
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="causal LM loss")
    return fig


def insert_figure(envelope: dict) -> go.Figure:
    """Perplexities and task score of T, T' and D (the organ's source, where meaningful)."""
    r = c.result_of(envelope)
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.62, 0.38],
        horizontal_spacing=0.12,
        subplot_titles=["perplexity (lower is better)", "task score"],
    )
    models = (
        ("before", "T (target)", c.TARGET),
        ("after", "T′ (with organ)", c.TRANSPLANTED),
        ("donor", "D (organ's source)", c.DONOR),
    )
    for key, label, colour in models:
        m = r.get(key) if isinstance(r.get(key), dict) else None
        if m is None:
            continue
        for col, metrics in ((1, _PPL), (2, (("task_score", "task score"),))):
            ys = [m.get(k) for k, _ in metrics]
            fig.add_trace(
                go.Bar(
                    x=[lab for _, lab in metrics],
                    y=ys,
                    name=label,
                    legendgroup=key,
                    showlegend=col == 1,
                    marker_color=colour,
                    text=[c.fmt_num(y, 4) for y in ys],
                    textposition="outside",
                    hovertemplate=f"{label}<br>%{{x}}: %{{y:.4g}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    dev = r.get("bridge_deviation")
    mode = r.get("strategy") or r.get("mode", "?")
    mode += f" ({r.get('bridge')} bridges)" if r.get("bridge") else ""
    parts = [f"position {r.get('position')}", mode]
    if isinstance(dev, dict):
        parts.append(f"‖W_in − I‖ {c.fmt_num(dev.get('in'), 3)}, ‖W_out − I‖ {c.fmt_num(dev.get('out'), 3)}")
    if len(r.get("placements") or []) > 1:
        parts.append(f"{len(r['placements'])} organs")
    parts.append(f"rollback bit-exact {c.CHECK if r.get('rollback_bit_exact') else c.CROSS}")
    c.apply_layout(
        fig,
        c.envelope_title(envelope, "OP2.3", "Organ insertion: before / after"),
        " · ".join(parts),
        height=500,
        filename=c.download_filename(envelope, "OP2.3", "organ_insert"),
        barmode="group",
        legend=dict(orientation="h", yanchor="top", y=-0.12, xanchor="left", x=0),
        margin=dict(l=70, r=40, t=120, b=110),
    )
    fig.update_yaxes(rangemode="tozero")
    if r.get("donor_note"):
        c.note(fig, "D not shown: " + r["donor_note"], y=-0.25)
    return fig


def position_figure(envelope: dict) -> go.Figure:
    """T9: concept and retained perplexity against position, T4's epsilon on a second axis."""
    r = c.result_of(envelope)
    pts = [p for p in (r.get("points") or []) if isinstance(p, dict)]
    xs = [p.get("position") for p in pts]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for (key, label), colour in zip(_PPL, (c.TRANSPLANTED, c.TARGET)):
        sd = [(p.get("spread") or {}).get(key) for p in pts]  # over seeds, when the strategy trains
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=[p.get(key) for p in pts],
                error_y=dict(type="data", array=[v or 0 for v in sd], visible=any(v for v in sd)),
                mode="lines+markers",
                name=label + (" (mean ± sd over seeds)" if any(v for v in sd) else ""),
                line=dict(color=colour),
                hovertemplate=f"p=%{{x}}<br>{label} %{{y:.4g}}<extra></extra>",
            ),
            secondary_y=False,
        )
    base = r.get("baseline") or {}
    if c.is_number(base.get("ppl_concept")):
        fig.add_hline(
            y=base["ppl_concept"],
            line=dict(color=c.MUTED, dash="dot"),
            annotation_text="T without organ (concept)",
            annotation_font_size=10,
        )
    if any(p.get("epsilon") is not None for p in pts):
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=[p.get("epsilon") for p in pts],
                mode="lines+markers",
                name=f"T4 epsilon ({r.get('epsilon_kind')})",
                line=dict(color=c.DONOR, dash="dash"),
                marker=dict(symbol="diamond"),
                hovertemplate="p=%{x}<br>epsilon %{y:.4f}<extra></extra>",
            ),
            secondary_y=True,
        )
    if not pts:
        _empty(fig, "no position in this result")
    best, worst = r.get("best") or {}, r.get("worst") or {}
    sub = (
        f"organ from source position s={r.get('s')}, k={r.get('size')}, "
        f"{r.get('strategy') or r.get('mode')} · best "
        f"p={best.get('position')} "
        f"({c.fmt_num(best.get('ppl_concept'), 4)}), worst p={worst.get('position')} "
        f"({c.fmt_num(worst.get('ppl_concept'), 4)}), "
        f"mean {c.fmt_num(r.get('mean'), 4)}, variance {c.fmt_num(r.get('variance'), 4)} · "
        "Spearman(epsilon, concept ppl) "
        f"{c.fmt_num(r.get('spearman_concept'), 3)}"
    )
    c.apply_layout(
        fig,
        c.envelope_title(envelope, "T9", "Position sensitivity"),
        sub,
        height=480,
        filename=c.download_filename(envelope, "T9", "position_sweep"),
        legend=dict(orientation="h", yanchor="top", y=-0.15, xanchor="left", x=0),
    )
    fig.update_xaxes(title_text="insertion position p", **c.int_axis(xs))
    fig.update_yaxes(title_text="perplexity", type="log", secondary_y=False)
    fig.update_yaxes(title_text="epsilon = 1 − cosine", secondary_y=True, showgrid=False)
    return fig


def deviation_figure(envelope: dict) -> go.Figure:
    """T10: ||W_in − I|| and ||W_out − I|| per position, closed-form and trained (per data size)."""
    r = c.result_of(envelope)
    pts = [p for p in (r.get("points") or []) if isinstance(p, dict)]
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        horizontal_spacing=0.06,
        subplot_titles=["‖W_in − I‖_F", "‖W_out − I‖_F"],
    )
    groups: dict[tuple[str, Any], list[dict]] = {}
    for p in pts:
        groups.setdefault((p.get("bridge"), p.get("n_texts")), []).append(p)
    for i, ((kind, n), rows) in enumerate(groups.items()):
        label = "closed-form" if kind == "closed-form" else f"trained on {n} texts"
        colour = c.SERIES[i % len(c.SERIES)]
        for col, key in ((1, "dev_in"), (2, "dev_out")):
            fig.add_trace(
                go.Bar(
                    x=[q.get("position") for q in rows],
                    y=[q.get(key) for q in rows],
                    name=label,
                    legendgroup=label,
                    showlegend=col == 1,
                    marker_color=colour,
                    hovertemplate=f"{label}<br>p=%{{x}}<br>%{{y:.4g}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    if not pts:
        _empty(fig, "no position in this result")
    c.apply_layout(
        fig,
        c.envelope_title(envelope, "T10", "Bridge deviation"),
        f"organ from source position s={r.get('s')}, k={r.get('size')} · bridges start at the identity",
        height=460,
        filename=c.download_filename(envelope, "T10", "bridge_deviation"),
        barmode="group",
        legend=dict(orientation="h", yanchor="top", y=-0.15, xanchor="left", x=0),
    )
    fig.update_xaxes(title_text="insertion position p")
    fig.update_yaxes(title_text="Frobenius distance from I", row=1, col=1)
    return fig
