"""Concept page figures: T5 concept cartography heatmap, T6 spectrum and rank-k.

Every number drawn comes from the result dict; nothing is recomputed here (choosing which
modules to draw, by the energy the result reports, is the only selection made).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import common as c

METRICS = ("share", "energy", "top_sv", "effective_rank")
METRIC_LABELS = {
    "energy": "energy ‖dW‖<sub>F</sub>",
    "share": "share of ‖dW‖<sub>F</sub>² (all modules)",
    "top_sv": "top singular value σ<sub>1</sub>",
    "effective_rank": "effective rank exp(H)",
}
METRIC_SHORT = {"energy": "energy", "share": "share", "top_sv": "top σ", "effective_rank": "effective rank"}
METRIC_SCALES = {"energy": "Viridis", "share": "Viridis", "top_sv": "Plasma", "effective_rank": "Cividis"}
SPECTRUM_CURVES = 8  # modules drawn by default: the largest by energy


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


def source_label(envelope: dict) -> str:
    """What the map is of: the adapter, or 'donor − base' for a full fine-tune."""
    e = envelope if isinstance(envelope, dict) else {}
    r = c.result_of(e)
    src = r.get("source") if isinstance(r.get("source"), dict) else {}
    if src.get("kind") == "finetune" or (e.get("donor") and e.get("base")):
        d = c.display_name(src.get("donor") or e.get("donor"), "donor")
        b = c.display_name(src.get("base") or e.get("base"), "base")
        return f"full fine-tune {d} − {b}"
    ad = src.get("adapter") if isinstance(src.get("adapter"), dict) else {}
    name = c.display_name(e.get("adapter") or ad.get("label") or src.get("label"), "adapter")
    if name in ("adapter", "") and ad.get("path"):
        name = c.display_name(ad.get("path"), "adapter")
    return f"adapter {name}"


def _title(envelope: dict, code: str, title: str) -> str:
    return f"{c.tool_code(envelope, code)} {title} — {source_label(envelope)}"


def _filename(envelope: dict, code: str, tool: str) -> str:
    return c.slug(f"graft_{c.tool_code(envelope, code)}_{tool}_{source_label(envelope)}")


def _rows(r: dict, key: str) -> list[dict]:
    return [m for m in (r.get(key) or []) if isinstance(m, dict)]


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if c.is_number(v) else "—"


def _warnings_note(fig: go.Figure, r: dict, y: float) -> None:
    ws = [str(w) for w in (r.get("warnings") or []) if w]
    if ws:
        shown = ws[:2] + ([f"(+{len(ws) - 2} more warnings)"] if len(ws) > 2 else [])
        c.note(fig, "<br>".join("⚠ " + (w if len(w) <= 150 else w[:147] + "…") for w in shown), y=y)


# =============================================================================================
# T5 Concept cartography
# =============================================================================================
def cartography_figure(envelope: dict, metric: str = "share") -> go.Figure:
    """Heatmap layers x module names coloured by ``metric`` (``share``, ``energy``, ``top_sv``,
    ``effective_rank``; a dropdown switches among them), with every number in the hover, and
    each layer's share of the update as bars beside it."""
    r = c.result_of(envelope)
    metric = metric if metric in METRICS else "share"
    layers = list(r.get("layers") or [])
    modules = list(r.get("modules") or [])
    grid = r.get("grid") if isinstance(r.get("grid"), dict) else {}
    cells = _rows(r, "cells")
    at = {(cl.get("layer"), cl.get("module")): cl for cl in cells}
    custom = []
    for l in layers:
        row = []
        for m in modules:
            cl = at.get((l, m)) or {}
            cap = cl.get("captured_share")
            row.append(
                [
                    cl.get("name", "—"),
                    c.fmt_num(cl.get("energy"), 4),
                    _pct(cl.get("share")),
                    c.fmt_num(cl.get("top_sv"), 4),
                    c.fmt_num(cl.get("effective_rank"), 2),
                    c.fmt_num(cl.get("rank")),
                    cl.get("kind", "—"),
                    ""
                    if cap is None or (c.is_number(cap) and cap >= 0.9999995)
                    else f"<br>captured by top {cl.get('rank')}: {_pct(cap)}",
                ]
            )
        custom.append(row)

    fig = make_subplots(rows=1, cols=2, column_widths=[0.8, 0.2], shared_yaxes=True, horizontal_spacing=0.02)
    order = [metric] + [m for m in METRICS if m != metric]
    n_rows, n_cols = len(layers), len(modules)
    for m in order:
        z = grid.get(m) or []
        if c.matrix_shape(z) != (n_rows, n_cols):
            z = [[None] * n_cols for _ in layers]
        heat: dict[str, Any] = dict(
            z=z,
            x=modules,
            y=layers,
            colorscale=METRIC_SCALES[m],
            hoverongaps=False,
            visible=(m == metric),
            name=METRIC_SHORT[m],
            customdata=custom,
            zmin=0.0 if m in ("share", "energy", "top_sv") else None,
            colorbar=dict(title=dict(text=METRIC_LABELS[m]), thickness=14, x=1.02),
            hovertemplate="<b>%{customdata[0]}</b> (%{customdata[6]})<br>layer %{y} · %{x}"
            "<br>energy ‖dW‖<sub>F</sub> %{customdata[1]}<br>share %{customdata[2]}"
            "<br>top σ %{customdata[3]}<br>effective rank %{customdata[4]} of %{customdata[5]}"
            "%{customdata[7]}<extra></extra>",
        )
        if c.cell_text_ok(n_rows, n_cols):
            heat.update(texttemplate="%{z:.2f}", textfont=dict(size=10))
        fig.add_trace(go.Heatmap(**heat), row=1, col=1)
    shares = list(r.get("layer_shares") or [])
    if len(shares) == n_rows and n_rows:
        fig.add_trace(
            go.Bar(
                x=shares,
                y=layers,
                orientation="h",
                marker_color=c.SERIES[0],
                name="layer share",
                showlegend=False,
                customdata=[_pct(s) for s in shares],
                hovertemplate="layer %{y}<br>share of the update %{customdata}<extra></extra>",
            ),
            row=1,
            col=2,
        )
    n_heat = len(order)
    has_bar = len(fig.data) > n_heat
    if not n_rows or not n_cols:
        _no_data(fig, "no module of a transformer block in this result")

    buttons = []
    for i, m in enumerate(order):
        vis = [j == i for j in range(n_heat)] + ([True] if has_bar else [])
        buttons.append(dict(label=METRIC_SHORT[m], method="update", args=[{"visible": vis}]))
    # Buttons listed in METRICS order, whatever is shown first.
    buttons = sorted(buttons, key=lambda b: [METRIC_SHORT[m] for m in METRICS].index(b["label"]))
    active = [b["label"] for b in buttons].index(METRIC_SHORT[metric])

    t = r.get("totals") if isinstance(r.get("totals"), dict) else {}
    ks = r.get("kind_shares") if isinstance(r.get("kind_shares"), dict) else {}
    kind_txt = ", ".join(f"{k} {_pct(v)}" for k, v in ks.items())
    parts = [
        f"{c.fmt_num(t.get('n_modules'))} modules in {c.fmt_num(t.get('n_layers'))} layers",
        f"total ‖dW‖<sub>F</sub> {c.fmt_num(t.get('energy'), 3)}",
        f"by kind: {kind_txt or '—'}",
    ]
    line2 = [
        f"top module {t.get('top_module') or '—'}",
        f"top layer {c.fmt_num(t.get('top_layer'))}",
        f"top 10 modules hold {_pct(t.get('top10_share'))}",
    ]
    if c.is_number(t.get("captured_share")) and t["captured_share"] < 0.9999995:
        line2.append(f"top-{c.fmt_num(t.get('max_rank'))} SVD captures {_pct(t.get('captured_share'))}")
    outside = [cl for cl in cells if isinstance(cl.get("layer"), int) and cl["layer"] < 0]
    if outside:
        line2.append(f"{len(outside)} module(s) outside the blocks not drawn")
    n_warn = len([w for w in (r.get("warnings") or []) if w])
    c.apply_layout(
        fig,
        _title(envelope, "T5", "Concept cartography"),
        " · ".join(parts) + "<br>" + " · ".join(line2),
        height=int(max(480, min(1100, 230 + 22 * max(n_rows, 1)))) + (40 if n_warn else 0),
        filename=_filename(envelope, "T5", "cartography"),
        margin=dict(l=70, r=120, t=150, b=90 + (30 * min(n_warn, 3))),
        updatemenus=[
            dict(
                type="dropdown",
                direction="down",
                buttons=buttons,
                active=active,
                showactive=True,
                x=1.0,
                xanchor="right",
                y=1.0,
                yanchor="bottom",
                pad=dict(b=6),
            )
        ],
        annotations=list(fig.layout.annotations or [])
        + [
            dict(
                text="colour by",
                xref="paper",
                yref="paper",
                x=0.87,
                xanchor="right",
                y=1.0,
                yanchor="bottom",
                showarrow=False,
                font=dict(size=12, color=c.MUTED),
                yshift=14,
            )
        ],
    )
    fig.update_xaxes(
        title_text="module",
        type="category",
        categoryorder="array",
        categoryarray=modules,
        showgrid=False,
        row=1,
        col=1,
    )
    fig.update_yaxes(
        title_text="layer", showgrid=False, autorange="reversed", **c.int_axis(layers), row=1, col=1
    )
    fig.update_xaxes(title_text="share per layer", rangemode="tozero", tickformat=".0%", row=1, col=2)
    _warnings_note(fig, r, y=-0.1)
    return fig


# =============================================================================================
# T6 Spectrum and rank-k
# =============================================================================================
def spectrum_figure(
    envelope: dict, modules: Optional[Sequence[str]] = None, top: int = SPECTRUM_CURVES
) -> go.Figure:
    """Cumulative energy curves and singular values of chosen modules (``modules``: names; by
    default the ``top`` largest by energy) with the threshold line and each module's recommended
    k marked, over a layers x module-names heatmap of the recommended k of every module."""
    r = c.result_of(envelope)
    rows = _rows(r, "modules")
    thr = r.get("threshold")
    if modules:
        wanted = [str(m) for m in modules]
        by_name = {m.get("name"): m for m in rows}
        chosen = [by_name[n] for n in wanted if n in by_name]
    else:
        chosen = sorted(rows, key=lambda m: -(m.get("energy") or 0.0))[: max(1, int(top))]
    layers = list(r.get("layers") or [])
    names = list(r.get("module_names") or [])
    k_grid = r.get("k_grid") or []

    fig = make_subplots(
        rows=2,
        cols=2,
        row_heights=[0.56, 0.44],
        vertical_spacing=0.16,
        horizontal_spacing=0.1,
        specs=[[{}, {}], [{"colspan": 2}, None]],
        subplot_titles=[
            "cumulative energy share",
            "singular values",
            f"recommended k at {c.fmt_num(thr, 2)} of the energy",
        ],
    )
    for i, m in enumerate(chosen):
        colour = c.SERIES[i % len(c.SERIES)]
        sv = [s for s in (m.get("singular_values") or []) if c.is_number(s)]
        cum = list(m.get("energy_cumulative") or [])
        ks = list(range(1, len(cum) + 1))
        name = str(m.get("name"))
        fig.add_trace(
            go.Scatter(
                x=ks,
                y=cum,
                mode="lines+markers",
                name=name,
                legendgroup=name,
                line=dict(color=colour, width=2),
                marker=dict(size=5),
                hovertemplate=f"{name}<br>k = %{{x}}<br>cumulative share %{{y:.4f}}<extra></extra>",
            ),
            row=1,
            col=1,
        )
        k = m.get("k_at_threshold")
        if isinstance(k, int) and 1 <= k <= len(cum):
            fig.add_trace(
                go.Scatter(
                    x=[k],
                    y=[cum[k - 1]],
                    mode="markers",
                    legendgroup=name,
                    showlegend=False,
                    marker=dict(symbol="diamond", size=12, color=colour, line=dict(color="white", width=1.5)),
                    hovertemplate=f"{name}<br>recommended k = {k}<br>share %{{y:.4f}}<extra></extra>",
                ),
                row=1,
                col=1,
            )
        fig.add_trace(
            go.Scatter(
                x=list(range(1, len(sv) + 1)),
                y=sv,
                mode="lines+markers",
                name=name,
                legendgroup=name,
                showlegend=False,
                line=dict(color=colour, width=2),
                marker=dict(size=5),
                hovertemplate=f"{name}<br>σ<sub>%{{x}}</sub> = %{{y:.4g}}<extra></extra>",
            ),
            row=1,
            col=2,
        )
    if c.matrix_shape(k_grid) == (len(layers), len(names)) and layers and names:
        fig.add_trace(
            go.Heatmap(
                z=k_grid,
                x=names,
                y=layers,
                colorscale="Blues",
                hoverongaps=False,
                zmin=0,
                name="k",
                colorbar=dict(title=dict(text="k"), thickness=12, len=0.4, y=0.2, yanchor="middle"),
                hovertemplate="layer %{y} · %{x}<br>recommended k %{z}<extra></extra>",
                **(
                    dict(texttemplate="%{z}", textfont=dict(size=10))
                    if c.cell_text_ok(len(layers), len(names), 30)
                    else {}
                ),
            ),
            row=2,
            col=1,
        )
    if not rows:
        _no_data(fig, "no module in this result")

    s = r.get("summary") if isinstance(r.get("summary"), dict) else {}
    by_kind = s.get("median_k_by_kind") if isinstance(s.get("median_k_by_kind"), dict) else {}
    parts = [
        f"threshold {c.fmt_num(thr, 2)}",
        f"median k {c.fmt_num(s.get('median_k'), 1)}",
        f"max k {c.fmt_num(s.get('max_k'))}",
        f"modules {c.fmt_num(s.get('n_modules'))}",
    ]
    line2 = [f"median k {k}: {c.fmt_num(v, 1)}" for k, v in by_kind.items()]
    if s.get("n_undetermined"):
        line2.append(f"{s['n_undetermined']} module(s) need more than the computed rank")
    line2.append(f"curves: {'chosen modules' if modules else f'the {len(chosen)} largest by energy'}")
    n_warn = len([w for w in (r.get("warnings") or []) if w])
    c.apply_layout(
        fig,
        _title(envelope, "T6", "Spectrum and rank-k"),
        " · ".join(parts) + "<br>" + " · ".join(line2),
        height=int(min(1400, 640 + 16 * max(len(layers), 1))) + (40 if n_warn else 0),
        filename=_filename(envelope, "T6", "spectrum"),
        legend=dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=1.01, title_text="module"),
        margin=dict(l=70, r=200, t=150, b=80 + 30 * min(n_warn, 3)),
    )
    if c.is_number(thr):
        fig.add_hline(
            y=thr,
            line=dict(color=c.TRANSPLANTED, dash="dash", width=1.5),
            row=1,
            col=1,
            annotation_text=f"threshold {thr:g}",
            annotation_position="bottom right",
            annotation_font=dict(size=11, color=c.TRANSPLANTED),
        )
    fig.update_xaxes(
        title_text="k (singular directions kept)",
        dtick=1 if max((len(m.get("energy_cumulative") or []) for m in chosen), default=0) <= 20 else None,
        row=1,
        col=1,
    )
    firsts = [
        m["energy_cumulative"][0]
        for m in chosen
        if m.get("energy_cumulative") and c.is_number(m["energy_cumulative"][0])
    ]
    lo = min(firsts + ([thr] if c.is_number(thr) else []), default=0.0)
    fig.update_yaxes(title_text="share of ‖dW‖<sub>F</sub>²", range=[max(0.0, lo - 0.05), 1.02], row=1, col=1)
    fig.update_xaxes(title_text="index i", row=1, col=2)
    fig.update_yaxes(title_text="σ<sub>i</sub>", type="log", row=1, col=2)
    fig.update_xaxes(
        title_text="module",
        type="category",
        categoryorder="array",
        categoryarray=names,
        showgrid=False,
        row=2,
        col=1,
    )
    fig.update_yaxes(
        title_text="layer", showgrid=False, autorange="reversed", **c.int_axis(layers), row=2, col=1
    )
    _warnings_note(fig, r, y=-0.06)
    return fig
