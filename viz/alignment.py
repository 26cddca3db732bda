"""Alignment page figures: T2 layer similarity (CKA), T3 Procrustes residuals, T4 bridge sufficiency.

Every number drawn comes from the result dict; nothing is recomputed here.
"""

from __future__ import annotations

import textwrap
from typing import Any, Optional, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import common as c

ALIGNMENT_MODES = {
    "token": "token level (same tokenizer)",
    "word": "word level (mean-pooled per word)",
    "text": "text level (mean-pooled per text)",
}


def _mode(r: dict) -> str:
    m = r.get("alignment")
    return ALIGNMENT_MODES.get(str(m), str(m)) if m is not None else "—"


def _axis_values(values: Any, n: int) -> list[Any]:
    """Axis coordinates: the result's own labels when they fit the matrix, else 0..n-1."""
    vals = list(values or [])
    return vals if len(vals) == n else list(range(n))


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


# =============================================================================================
# T2 Layer similarity map
# =============================================================================================
def cka_figure(envelope: dict) -> go.Figure:
    """Heatmap of linear CKA (y = donor layer, x = target layer) with the monotone matching on top."""
    r = c.result_of(envelope)
    donor, target = c.model_names(envelope)
    M = r.get("matrix") or []
    n_rows, n_cols = c.matrix_shape(M)
    dl = _axis_values(r.get("donor_layers"), n_rows)
    tl = _axis_values(r.get("target_layers"), n_cols)

    fig = go.Figure()
    custom = [[[c.layer_hover(d), c.layer_hover(t)] for t in tl] for d in dl]
    debiased = r.get("estimator") == "debiased"
    heat: dict[str, Any] = dict(
        z=M,
        x=tl,
        y=dl,
        zmin=0.0,
        zmax=1.0,
        colorscale=c.SIMILARITY_SCALE,
        colorbar=dict(title=dict(text="debiased CKA" if debiased else "linear CKA"), thickness=14),
        customdata=custom,
        name="CKA",
        hovertemplate="donor layer %{customdata[0]}<br>target layer %{customdata[1]}<br>CKA "
        "%{z:.3f}<extra></extra>",
    )
    if c.cell_text_ok(n_rows, n_cols):
        heat.update(texttemplate="%{z:.2f}", textfont=dict(size=11))
    fig.add_trace(go.Heatmap(**heat))

    matching = r.get("matching") or []
    if matching:
        mc = r.get("matching_cka") or []
        mcka = [c.fmt_num(mc[k], 3) if k < len(mc) else "—" for k in range(len(matching))]
        fig.add_trace(
            go.Scatter(
                x=[p[1] for p in matching],
                y=[p[0] for p in matching],
                mode="lines+markers",
                name="best monotone matching",
                line=dict(color=c.TRANSPLANTED, width=2.5),
                # open rings keep the cell values underneath readable
                marker=dict(symbol="circle-open", size=30, color=c.TRANSPLANTED, line=dict(width=3)),
                customdata=[[c.layer_hover(p[0]), c.layer_hover(p[1]), v] for p, v in zip(matching, mcka)],
                hovertemplate="matched: donor layer %{customdata[0]} → target layer %{customdata[1]}"
                "<br>CKA %{customdata[2]}<extra></extra>",
            )
        )
    if not n_rows or not n_cols:
        _no_data(fig, "empty CKA matrix")

    parts = [
        f"mean matched CKA {c.fmt_num(r.get('mean_matched_cka'), 3)}",
        f"rows aligned at {_mode(r)}",
        f"n = {c.fmt_num(r.get('n_rows'))} aligned rows",
    ]
    c.apply_layout(
        fig,
        c.envelope_title(envelope, "T2", "Layer similarity (linear CKA)"),
        " · ".join(parts),
        height=max(480, min(900, 260 + 28 * n_rows)),
        filename=c.download_filename(envelope, "T2", "cka"),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
    )
    fig.update_xaxes(title_text=f"target layer ({target})", showgrid=False, **c.int_axis(tl))
    fig.update_yaxes(title_text=f"donor layer ({donor})", showgrid=False, **c.int_axis(dl))
    return fig


# =============================================================================================
# T3 Per-layer Procrustes residuals
# =============================================================================================
_RESIDUALS = (
    # key, legend name, dash, marker symbol, visible
    ("residual_fit", "Procrustes, fit rows", "solid", "circle", True),
    ("residual_heldout", "Procrustes, held-out rows", "solid", "square", True),
    ("residual_ridge", "ridge (unconstrained linear), held-out", "dash", "diamond", True),
    ("residual_ridge_fit", "ridge (unconstrained linear), fit rows", "dot", "diamond-open", "legendonly"),
    ("residual_identity", "identity map, held-out", "dashdot", "x", True),
)


def procrustes_figure(envelope: dict) -> go.Figure:
    """Normalised residual per matched layer pair: Procrustes fit vs held-out, ridge and identity
    baselines."""
    r = c.result_of(envelope)
    layers = [l for l in (r.get("layers") or []) if isinstance(l, dict)]
    labels = [
        f"donor {c.layer_label(l.get('donor_layer'))} → target {c.layer_label(l.get('target_layer'))}"
        for l in layers
    ]
    align = [c.fmt_num(l.get("alignment"), 3) for l in layers]
    rank_txt = [_rank_hover(l, r.get("completion")) for l in layers]
    warnings = [str(w) for w in (r.get("warnings") or []) if w]

    fig = go.Figure()
    label_points = 0 < len(layers) <= 12  # write the alignment next to each held-out point when readable
    colours = dict(
        zip([k for k, *_ in _RESIDUALS], (c.SERIES[0], c.SERIES[1], c.SERIES[2], c.SERIES[2], c.SERIES[7]))
    )
    missing_identity = False
    for key, name, dash, symbol, visible in _RESIDUALS:
        pts = [
            (lab, l.get(key), a, rk)
            for lab, l, a, rk in zip(labels, layers, align, rank_txt)
            if c.is_number(l.get(key))
        ]
        if not pts:
            missing_identity |= key == "residual_identity" and bool(layers)
            continue
        hover = f"{name}: %{{y:.3f}}"
        if key == "residual_heldout":
            hover += "<br>Procrustes alignment (1 − held-out): %{customdata}<br>%{hovertext}"
        labelled = key == "residual_heldout" and label_points
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in pts],
                y=[p[1] for p in pts],
                customdata=[p[2] for p in pts],
                hovertext=[p[3] for p in pts] if key == "residual_heldout" else None,
                mode="lines+markers+text" if labelled else "lines+markers",
                name=name,
                visible=visible,
                text=[f"Procrustes alignment {p[2]}" for p in pts] if labelled else None,
                textposition="top center",
                textfont=dict(size=11, color=colours[key]),
                line=dict(color=colours[key], dash=dash, width=3 if key == "residual_heldout" else 2),
                marker=dict(symbol=symbol, size=9 if key == "residual_heldout" else 7),
                hovertemplate=hover + "<extra></extra>",
            )
        )
    if layers:
        fig.add_hline(
            y=1.0,
            line=dict(color=c.MUTED, dash="dot", width=1),
            annotation_text="residual 1 = no better than predicting 0",
            annotation_position="top left",
            annotation_font=dict(size=11, color=c.MUTED),
        )
    else:
        _no_data(fig, "no matched layer pairs")

    pairs = r.get("pairs")
    pairs_txt = {"matching": "T2 monotone CKA matching", "depth": "equal relative depth"}.get(
        str(pairs), str(pairs)
    )
    where = " in the fit rows' principal subspace" if r.get("estimator") == "principal subspace" else ""
    line1 = [
        f"mean Procrustes alignment (1 − held-out residual{where}) {c.fmt_num(r.get('mean_alignment'), 3)}",
        f"pairs: {pairs_txt}",
    ]
    line2 = [
        f"n_fit {c.fmt_num(r.get('n_fit'))} / n_held-out {c.fmt_num(r.get('n_heldout'))} rows",
        f"rows aligned at {_mode(r)}",
    ]
    if "donor_width" in r or "target_width" in r:
        line2.append(f"widths {c.fmt_num(r.get('donor_width'))} → {c.fmt_num(r.get('target_width'))}")
    if c.is_number(r.get("rows_per_width")):
        line2.append(f"{c.fmt_num(r.get('rows_per_width'), 2)} fit rows per width")
    n_under = sum(1 for l in layers if l.get("underdetermined") is True)
    title = c.envelope_title(envelope, "T3", "Per-layer Procrustes residuals")
    if n_under:
        title += f" — ⚠ underdetermined in {n_under}/{len(layers)} layers"
    c.apply_layout(
        fig,
        title,
        " · ".join(line1) + "<br>" + " · ".join(line2),
        height=520,
        filename=c.download_filename(envelope, "T3", "procrustes"),
        hovermode="x unified",
        legend=dict(orientation="h", yanchor="top", y=-0.22, xanchor="left", x=0),
        margin=dict(l=70, r=40, t=120, b=150),
    )
    fig.update_xaxes(
        title_text="matched layer pair", type="category", categoryorder="array", categoryarray=labels
    )
    fig.update_yaxes(
        title_text="normalised residual ‖XR − Y‖²<sub>F</sub> / ‖Y‖²<sub>F</sub>", rangemode="tozero"
    )
    if missing_identity:
        c.note(fig, "identity baseline not shown: donor and target widths differ", y=-0.42)
    if warnings:
        # the tool's own warning lines (e.g. an underdetermined fit), wrapped, in the warning colour above
        # the plot
        lines = [ln for w in warnings for ln in textwrap.wrap("⚠ " + w, 130, subsequent_indent="   ")]
        fig.add_annotation(
            text="<br>".join(lines),
            xref="paper",
            yref="paper",
            x=0,
            y=1.02,
            xanchor="left",
            yanchor="bottom",
            showarrow=False,
            align="left",
            font=dict(size=11, color=c.BAD),
        )
        fig.update_layout(margin=dict(t=130 + 16 * len(lines)), height=520 + 16 * len(lines))
    return fig


def _rank_hover(layer: dict, completion: Any) -> str:
    """Hover line with the fit's rank and whether the map had to be completed, as the result reports."""
    text = f"rank of XᵀY (fit rows) {c.fmt_num(layer.get('rank'))}"
    if layer.get("underdetermined") is True and layer.get("estimator") == "principal subspace":
        energy = layer.get("heldout_energy_in_subspace")
        text += (
            f" — underdetermined: measured in the top {c.fmt_num(layer.get('subspace_rank'))} principal "
            f"directions ({c.fmt_num(100 * energy if c.is_number(energy) else None, 0)}% of held-out energy)"
        )
    elif layer.get("underdetermined") is True:
        text += " — underdetermined" + (f", map completed {completion}" if completion else "")
    return text


# =============================================================================================
# T4 Bridge sufficiency
# =============================================================================================
def _cell(M: Optional[Sequence[Sequence[Any]]], i: int, j: int) -> Any:
    try:
        return M[i][j] if M is not None else None
    except (IndexError, TypeError):
        return None


def bridge_figure(envelope: dict) -> go.Figure:
    """epsilon = 1 - cosine over (donor position s, target position p): raw and after the best linear
    bridge."""
    r = c.result_of(envelope)
    donor, target = c.model_names(envelope)
    eps_raw = r.get("epsilon_raw")
    eps_b = r.get("epsilon_bridged") or []
    cos_raw, cos_b = r.get("cos_raw"), r.get("cos_bridged")
    thr = r.get("threshold")
    has_raw = eps_raw is not None
    n_s, n_p = c.matrix_shape(eps_b if eps_b else (eps_raw or []))
    sp = _axis_values(r.get("donor_positions"), n_s)
    pp = _axis_values(r.get("target_positions"), n_p)

    panels = (
        [("raw (no bridge)", eps_raw), ("after linear bridge", eps_b)]
        if has_raw
        else [("after linear bridge", eps_b)]
    )
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        shared_yaxes=True,
        horizontal_spacing=0.06,
        subplot_titles=[t for t, _ in panels],
    )

    # Hover: both cosines (and both epsilons) on every cell, pre-formatted so None reads "—".
    custom = [
        [
            [
                c.fmt_num(_cell(eps_raw, i, j), 3),
                c.fmt_num(_cell(cos_raw, i, j), 3),
                c.fmt_num(_cell(eps_b, i, j), 3),
                c.fmt_num(_cell(cos_b, i, j), 3),
            ]
            for j in range(n_p)
        ]
        for i in range(n_s)
    ]
    hover = (
        "donor position s = %{y} (input h<sub>s−1</sub>)<br>target position p = %{x} (input "
        "h<sub>p−1</sub>)<br>"
    )
    if has_raw:
        hover += "raw: ε %{customdata[0]}, cos %{customdata[1]}<br>"
    hover += "bridged: ε %{customdata[2]}, cos %{customdata[3]}<extra></extra>"

    values = [v for _, M in panels for row in (M or []) for v in row if c.is_number(v)]
    cmax = max([1.0] + values)  # colour range 0 .. max(1, largest epsilon): 1 = orthogonal streams
    small = c.cell_text_ok(n_s, n_p, 12)
    for k, (name, M) in enumerate(panels):
        heat: dict[str, Any] = dict(
            z=M, x=pp, y=sp, coloraxis="coloraxis", customdata=custom, hovertemplate=hover, name=f"ε {name}"
        )
        if small:
            heat.update(texttemplate="%{z:.2f}", textfont=dict(size=10))
        fig.add_trace(go.Heatmap(**heat), row=1, col=k + 1)

    thr_txt = c.fmt_num(thr, 3) if c.is_number(thr) else "threshold"
    plausible = [p for p in (r.get("plausible_direct") or []) if isinstance(p, (list, tuple)) and len(p) == 2]
    if has_raw and plausible:
        fig.add_trace(
            go.Scatter(
                x=[p[1] for p in plausible],
                y=[p[0] for p in plausible],
                mode="markers",
                name=f"direct replacement plausible (ε raw < {thr_txt})",
                marker=dict(symbol="square-open", size=30, color="#F0A202", line=dict(width=3.5)),
                customdata=[
                    [c.fmt_num(_cell(eps_raw, s, p), 3), c.fmt_num(_cell(cos_raw, s, p), 3)]
                    for s, p in plausible
                ],
                hovertemplate="direct replacement plausible<br>s = %{y}, p = %{x}<br>raw ε "
                "%{customdata[0]}, "
                "cos %{customdata[1]}<extra></extra>",
            ),
            row=1,
            col=1,
        )

    best = [
        b for b in (r.get("best_target_for_donor") or []) if isinstance(b, dict) and "s" in b and "p" in b
    ]
    if best:
        fig.add_trace(
            go.Scatter(
                x=[b["p"] for b in best],
                y=[b["s"] for b in best],
                mode="markers",
                name="best target position per donor position (after bridge)",
                marker=dict(symbol="circle-open", size=30, color=c.TRANSPLANTED, line=dict(width=3)),
                customdata=[
                    [c.fmt_num(b.get("epsilon_bridged"), 3), c.fmt_num(b.get("epsilon_raw"), 3)] for b in best
                ],
                hovertemplate="best p for s = %{y}: p = %{x}<br>bridged ε %{customdata[0]}<br>raw ε "
                "%{customdata[1]}"
                "<extra></extra>",
            ),
            row=1,
            col=len(panels),
        )

    if not n_s or not n_p:
        _no_data(fig, "no positions to compare")

    parts = ["ε = 1 − mean cosine of target h<sub>p−1</sub> and donor h<sub>s−1</sub> on held-out rows"]
    if has_raw:
        parts.append(
            f"{len(plausible)} (s, p) with raw ε < {thr_txt}"
            if plausible
            else f"no (s, p) with raw ε < {thr_txt}: direct replacement not plausible anywhere"
        )
    else:
        parts.append("hidden sizes differ: no raw comparison, bridged only")
    parts.append(
        f"rows aligned at {_mode(r)}, n_fit {c.fmt_num(r.get('n_fit'))} / n_held-out "
        f"{c.fmt_num(r.get('n_heldout'))}"
    )
    c.apply_layout(
        fig,
        c.envelope_title(envelope, "T4", "Bridge sufficiency"),
        "<br>".join(parts[:1] + [" · ".join(parts[1:])]),
        height=max(500, min(900, 320 + 26 * n_s)),
        filename=c.download_filename(envelope, "T4", "bridge"),
        coloraxis=dict(
            colorscale=c.EPSILON_SCALE,
            reversescale=True,
            cmin=0.0,
            cmax=cmax,
            colorbar=dict(title=dict(text="ε = 1 − cos"), thickness=14),
        ),
        showlegend=True,  # plotly hides a legend of one entry; the marker meaning must stay visible
        legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0),
        margin=dict(l=70, r=30, t=130, b=120),
    )
    for k in range(len(panels)):
        fig.update_xaxes(
            title_text=f"target position p ({target})",
            showgrid=False,
            row=1,
            col=k + 1,
            **c.int_axis(pp, str),
        )
    fig.update_yaxes(
        title_text=f"donor position s ({donor})", showgrid=False, row=1, col=1, **c.int_axis(sp, str)
    )
    fig.update_yaxes(showgrid=False)
    return fig
