"""Transplant page figures: T7 module ranking, T11 module swap before/after, T8 strength sweep.

Every number drawn comes from the result dict; nothing is recomputed here.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import common as c

TOP_BARS = 30
_KIND_LABEL = {"attention": "attention", "mlp": "MLP"}


def _no_data(fig: go.Figure, text: str) -> None:
    fig.add_annotation(
        text=text,
        xref="paper",
        yref="paper",
        x=0.5,
        y=0.5,
        showarrow=False,
        font=dict(size=14, color=c.MUTED),
    )


def _rows(r: dict, key: str) -> list[dict]:
    return [m for m in (r.get(key) or []) if isinstance(m, dict)]


# =============================================================================================
# T7 Activation-difference module ranking
# =============================================================================================
def rank_figure(envelope: dict) -> go.Figure:
    """Top modules as horizontal bars coloured by kind, over a layers x module-kind strip of scores."""
    r = c.result_of(envelope)
    mods = _rows(r, "modules")
    top = mods[:TOP_BARS]
    strip = r.get("strip") or []
    rows, layers = list(r.get("strip_rows") or []), list(r.get("strip_layers") or [])
    n_bars = max(len(top), 1)
    fig = make_subplots(
        rows=2,
        cols=1,
        row_heights=[0.72, 0.28],
        vertical_spacing=0.12,
        subplot_titles=[
            f"top {len(top)} of {c.fmt_num(r.get('n_modules'))} modules (best first)",
            "score per layer and module",
        ],
    )
    names = [m.get("name") for m in top]
    for kind in ("attention", "mlp"):
        pts = [m for m in top if m.get("kind") == kind]
        if not pts:
            continue
        fig.add_trace(
            go.Bar(
                x=[m.get("score") for m in pts],
                y=[m.get("name") for m in pts],
                orientation="h",
                name=_KIND_LABEL[kind],
                marker_color=c.KIND_COLOURS[kind],
                legendgroup=kind,
                customdata=[[c.fmt_num(m.get("consistency"), 2), c.layer_hover(m.get("layer"))] for m in pts],
                hovertemplate="%{y}<br>score %{x:.3f}<br>consistency %{customdata[0]}<br>layer "
                "%{customdata[1]}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    if strip and rows and layers:
        heat: dict[str, Any] = dict(
            z=strip,
            x=layers,
            y=rows,
            colorscale=c.SIMILARITY_SCALE,
            hoverongaps=False,
            colorbar=dict(title=dict(text="score"), thickness=12, len=0.26, y=0.13, yanchor="middle"),
            hovertemplate="layer %{x} · %{y}<br>score %{z:.3f}<extra></extra>",
            name="score",
        )
        if c.cell_text_ok(len(rows), len(layers), 16):
            heat.update(texttemplate="%{z:.2f}", textfont=dict(size=10))
        fig.add_trace(go.Heatmap(**heat), row=2, col=1)
    if not top:
        _no_data(fig, "no module present in both models with equal shape")

    k = r.get("top_decile_size")
    parts = [
        "score = mean ‖o<sub>D</sub> − o<sub>T</sub>‖ / mean ‖o<sub>T</sub>‖",
        f"{c.fmt_num(r.get('n_attention'))} attention / {c.fmt_num(r.get('n_mlp'))} MLP modules",
        f"top decile ({c.fmt_num(k)}): {c.fmt_num(r.get('top_decile_attention'))} attention, "
        f"{c.fmt_num(r.get('top_decile_mlp'))} MLP",
        f"n = {c.fmt_num(r.get('n_tokens'))} tokens in {c.fmt_num(r.get('n_texts'))} texts",
    ]
    c.apply_layout(
        fig,
        c.envelope_title(envelope, "T7", "Activation-difference module ranking"),
        " · ".join(parts[:2]) + "<br>" + " · ".join(parts[2:]),
        height=int(min(1400, 420 + 22 * n_bars + 28 * max(len(rows), 1))),
        filename=c.download_filename(envelope, "T7", "rank-modules"),
        legend=dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=1.01, title_text="kind"),
        margin=dict(l=150, r=110, t=130, b=60),
    )
    fig.update_yaxes(autorange="reversed", categoryorder="array", categoryarray=names, row=1, col=1)
    fig.update_xaxes(title_text="relative output difference (score)", rangemode="tozero", row=1, col=1)
    fig.update_xaxes(title_text="layer", showgrid=False, **c.int_axis(layers), row=2, col=1)
    fig.update_yaxes(showgrid=False, row=2, col=1)
    return fig


# =============================================================================================
# T11 Module swap + before/after evaluation
# =============================================================================================
_MODELS = (
    ("before", "T (target)", "target"),
    ("after", "T′ (transplanted)", "transplanted"),
    ("donor", "D (donor)", "donor"),
)
_PPL = (("ppl_concept", "concept texts"), ("ppl_retained", "retained set"))
_SCORES = (("task_score_graded", "graded score"), ("task_score_exact", "exact score"))


def _transfer_text(r: dict) -> str:
    tir = r.get("tir")
    rec = r.get("recovery")
    a = f"TIR {c.fmt_num(tir, 3)}" if tir is not None else "TIR undefined"
    b = f"Recovery {c.fmt_num(rec, 3)}" if rec is not None else "Recovery undefined"
    return f"{a} · {b} (S = {r.get('score_kind', 'graded')} score)"


def swap_figure(envelope: dict) -> go.Figure:
    """Grouped bars of perplexities and task scores for T, T' and D."""
    r = c.result_of(envelope)
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.5, 0.5],
        horizontal_spacing=0.1,
        subplot_titles=["perplexity (lower is better)", "task score on held-out questions"],
    )
    any_bar = False
    for key, label, colour in _MODELS:
        m = r.get(key) if isinstance(r.get(key), dict) else {}
        for col, metrics in ((1, _PPL), (2, _SCORES)):
            ys = [m.get(k) for k, _ in metrics]
            any_bar |= any(c.is_number(y) for y in ys)
            fig.add_trace(
                go.Bar(
                    x=[lab for _, lab in metrics],
                    y=ys,
                    name=label,
                    legendgroup=key,
                    showlegend=col == 1,
                    marker_color=c.MODEL_COLOURS[colour],
                    text=[f"{y:.4g}" if c.is_number(y) else "—" for y in ys],
                    textposition="outside",
                    textfont=dict(size=10),
                    hovertemplate=f"{label}<br>%{{x}}: %{{y:.4g}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    if not any_bar:
        _no_data(fig, "no evaluation in this result")
    al = [r.get("alignment_before"), r.get("alignment_after")]
    mods = _rows(r, "modules")
    line2 = [
        f"{len(mods)} modules swapped ({r.get('selection', 'top-k')})",
        f"alignment score with D: T {c.fmt_num(al[0], 3)} → T′ {c.fmt_num(al[1], 3)}",
        f"rollback bit-exact {c.CHECK if r.get('rollback_bit_exact') else c.CROSS}",
    ]
    if r.get("saved_to"):
        line2.append(f"saved to {c.display_name(r.get('saved_to'), '')}")
    c.apply_layout(
        fig,
        c.envelope_title(envelope, "T11", "Module swap: before / after"),
        _transfer_text(r) + "<br>" + " · ".join(line2),
        height=520,
        filename=c.download_filename(envelope, "T11", "swap"),
        barmode="group",
        legend=dict(orientation="h", yanchor="top", y=-0.12, xanchor="left", x=0),
        margin=dict(l=70, r=40, t=130, b=120),
    )
    fig.update_yaxes(title_text="perplexity", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="score", rangemode="tozero", row=1, col=2)
    notes = [n for n in (r.get("tir_note"), r.get("recovery_note")) if n]
    if notes:
        c.note(fig, " · ".join(notes), y=-0.3)
    return fig


# =============================================================================================
# T8 Transplant-strength sweep
# =============================================================================================
def sweep_figure(envelope: dict) -> go.Figure:
    """TIR, Recovery (left axis) and retained perplexity (right axis) against K; attention/MLP share of
    the top K."""
    r = c.result_of(envelope)
    pts = _rows(r, "points")
    ks = [str(p.get("k")) for p in pts]
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.68, 0.32],
        vertical_spacing=0.08,
        specs=[[{"secondary_y": True}], [{}]],
        subplot_titles=["transfer and retention against K", "kinds among the top K"],
    )
    for key, name, colour, dash in (
        ("tir", "TIR = S(T+K)/S(T)", c.SERIES[0], "solid"),
        ("recovery", "Recovery", c.TRANSPLANTED, "solid"),
    ):
        fig.add_trace(
            go.Scatter(
                x=ks,
                y=[p.get(key) for p in pts],
                mode="lines+markers",
                name=name,
                line=dict(color=colour, dash=dash, width=2.5),
                connectgaps=False,
                hovertemplate=f"K = %{{x}}<br>{name}: %{{y:.3f}}<extra></extra>",
            ),
            row=1,
            col=1,
            secondary_y=False,
        )
    fig.add_trace(
        go.Scatter(
            x=ks,
            y=[p.get("ppl_retained") for p in pts],
            mode="lines+markers",
            name="retained perplexity",
            line=dict(color=c.SERIES[7], dash="dash", width=2),
            marker=dict(symbol="square"),
            hovertemplate="K = %{x}<br>retained perplexity %{y:.3f}<extra></extra>",
        ),
        row=1,
        col=1,
        secondary_y=True,
    )
    for key, kind in (("attention_share", "attention"), ("mlp_share", "mlp")):
        fig.add_trace(
            go.Bar(
                x=ks,
                y=[p.get(key) for p in pts],
                name=f"{_KIND_LABEL[kind]} share of top K",
                marker_color=c.KIND_COLOURS[kind],
                hovertemplate=f"K = %{{x}}<br>{_KIND_LABEL[kind]} share %{{y:.2f}}<extra></extra>",
            ),
            row=2,
            col=1,
        )
    if not pts:
        _no_data(fig, "no sweep points")
    t = r.get("target") if isinstance(r.get("target"), dict) else {}
    d = r.get("donor") if isinstance(r.get("donor"), dict) else {}
    sub = [
        f"S = {r.get('score_kind', 'graded')} score: T {c.fmt_num(t.get('task_score'), 4)}, D "
        f"{c.fmt_num(d.get('task_score'), 4)}",
        f"{c.fmt_num(r.get('n_swappable'))} swappable modules",
        f"rollback bit-exact {c.CHECK if r.get('rollback_bit_exact') else c.CROSS}",
    ]
    c.apply_layout(
        fig,
        c.envelope_title(envelope, "T8", "Transplant-strength sweep"),
        " · ".join(sub),
        height=680,
        filename=c.download_filename(envelope, "T8", "sweep-k"),
        barmode="stack",
        hovermode="x unified",
        legend=dict(orientation="h", yanchor="top", y=-0.16, xanchor="left", x=0),
        margin=dict(l=70, r=70, t=120, b=170),
    )
    if pts and (
        any(p.get("recovery") is not None for p in pts) or any(p.get("tir") is not None for p in pts)
    ):
        fig.add_hline(
            y=1.0,
            line=dict(color=c.MUTED, dash="dot", width=1),
            row=1,
            col=1,
            annotation_text="1 = donor level (Recovery) / no change (TIR)",
            annotation_position="bottom right",
            annotation_font=dict(size=11, color=c.MUTED),
        )
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=ks, row=1, col=1)
    fig.update_xaxes(
        title_text="K (top-ranked modules swapped)",
        type="category",
        categoryorder="array",
        categoryarray=ks,
        row=2,
        col=1,
    )
    fig.update_yaxes(title_text="TIR, Recovery", row=1, col=1, secondary_y=False)
    fig.update_yaxes(title_text="retained perplexity", showgrid=False, row=1, col=1, secondary_y=True)
    fig.update_yaxes(title_text="share", range=[0, 1], row=2, col=1)
    notes = [n for n in (r.get("tir_note"), r.get("recovery_note")) if n]
    if r.get("k_clipped"):
        notes.append(f"K values above {r.get('n_swappable')} clipped: {', '.join(map(str, r['k_clipped']))}")
    if notes:
        c.note(fig, "<br>".join(notes), y=-0.36)
    return fig
