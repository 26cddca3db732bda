"""Verdict page figures: T12 interference and stability, T13 attribution before / after.

* :func:`interference_figure`: histogram of the per-example loss change T' − T (retained set,
  and the user's texts when given) and the worst-hit examples' loss before and after; locality,
  retained perplexity change and the stability checks in the subtitle.
* :func:`interference_html`: the worst-hit table (text, losses, greedy continuations) and the
  retained prompts whose continuation changed, with the changed words marked (the engine's word diff).
* :func:`stability_rows`: the stability checks as rows (name, passed, detail) for a table.
* :func:`attribution_figure`: layers x tokens heatmaps of T, T′, D and T′ − T, and per-layer
  bars (absolute attribution mass) of T against T′. Layers the result flags as unreliable (convergence
  delta over the tolerance) are marked "⚠" on every axis, their bars hatched.

Everything shown is read from the result; nothing is computed here beyond picking fields.
"""

from __future__ import annotations

import html
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import common as c
from .compare import _CSS, _diff_html

_SETS = (("retained", "retained set", c.TARGET), ("extra", "your texts", c.DONOR))
_CHECKS = (
    ("reapply", "Applied twice: identical weight hashes"),
    ("reload", "Saved and reloaded: identical perplexity"),
)


def _source_label(r: dict) -> str:
    s = r.get("source") or {}
    mods = s.get("modules") or []
    what = f"run {s['run_id']}" if s.get("run_id") else "module swap made for this check"
    return f"{s.get('operation', 'transplant')} · {what} · {len(mods)} modules"


def _title(envelope: dict, code: str, title: str) -> str:
    r = c.result_of(envelope)
    s = r.get("source") or {}
    donor = c.display_name(envelope.get("donor") or s.get("donor"), "donor")
    target = c.display_name(envelope.get("target") or s.get("target"), "target")
    return c.figure_title(code, title, donor, target)


def stability_rows(result: dict) -> list[dict[str, Any]]:
    st = result.get("stability") or {}
    return [
        {"check": label, "passed": st[key].get("passed"), "detail": st[key].get("detail", "")}
        for key, label in _CHECKS
        if key in st
    ]


def _pct(v: Any) -> str:
    return f"{100 * v:+.2f}%" if c.is_number(v) else "—"


def interference_figure(envelope: dict) -> go.Figure:
    r = c.result_of(envelope)
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.5, 0.5],
        horizontal_spacing=0.12,
        subplot_titles=["per-example loss change T′ − T (nats)", "worst-hit examples: loss T and T′"],
    )
    for key, label, colour in _SETS:
        s = r.get(key)
        if not s or not s.get("histogram", {}).get("counts"):
            continue
        h = s["histogram"]
        edges = h["edges"]
        mids = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
        fig.add_trace(
            go.Bar(
                x=mids,
                y=h["counts"],
                width=widths,
                name=label,
                marker_color=colour,
                opacity=0.75,
                customdata=list(zip(edges[:-1], edges[1:])),
                hovertemplate=f"{label}<br>change %{{customdata[0]:.4g}} … %{{customdata[1]:.4g}}"
                "<br>%{y} examples<extra></extra>",
            ),
            row=1,
            col=1,
        )
    worst = (r.get("retained") or {}).get("worst") or []
    names = [f"#{w['index']}: {w['text'][:38]}{'…' if len(w['text']) > 38 else ''}" for w in worst][::-1]
    for field, label, colour in (("loss_before", "T", c.TARGET), ("loss_after", "T′", c.TRANSPLANTED)):
        fig.add_trace(
            go.Bar(
                y=names,
                x=[w.get(field) for w in worst][::-1],
                orientation="h",
                name=label,
                marker_color=colour,
                legendgroup=label,
                hovertemplate=f"{label}: %{{x:.4g}} nats<br>%{{y}}<extra></extra>",
            ),
            row=1,
            col=2,
        )
    fig.add_vline(x=0, line=dict(color=c.MUTED, dash="dot", width=1), row=1, col=1)
    ret = r.get("retained") or {}
    checks = stability_rows(r)
    stab = (
        " · ".join(
            f"{c.CHECK if x['passed'] else c.CROSS} {x['check'].split(':')[0].lower()}" for x in checks
        )
        or "stability not checked"
    )
    loc = r.get("locality")
    sub = (
        f"{_source_label(r)}<br>retained perplexity {c.fmt_num(ret.get('ppl_before'), 4)} → "
        f"{c.fmt_num(ret.get('ppl_after'), 4)} ({_pct(r.get('ppl_change_fraction'))}) · locality "
        f"{c.fmt_num(loc, 3) if c.is_number(loc) else '—'} ({ret.get('n_changed', '?')} of "
        f"{ret.get('n_prompts', '?')} prompts changed) · {stab}"
    )
    c.apply_layout(
        fig,
        _title(envelope, "T12", "Interference and stability"),
        sub,
        height=500,
        filename=c.download_filename(envelope, "T12", "interference"),
        barmode="group",
        legend=dict(orientation="h", yanchor="top", y=-0.16, xanchor="left", x=0),
        margin=dict(l=70, r=30, t=130, b=100),
    )
    fig.update_xaxes(title_text="loss(T′) − loss(T), nats per token", row=1, col=1)
    fig.update_yaxes(title_text="examples", row=1, col=1)
    fig.update_xaxes(title_text="mean token loss (nats)", row=1, col=2)
    return fig


def interference_html(envelope: dict, which: str = "retained") -> str:
    """The worst-hit examples and the changed prompts of one set ("retained" or "extra")."""
    s = c.result_of(envelope).get(which) or {}
    if not s:
        return _CSS + '<p class="graft-gen">no such set in this result</p>'
    out = [
        _CSS,
        "<h5>Worst hit</h5>",
        '<table class="graft-gen"><thead><tr><th class="n">#</th><th>text</th><th class="n">loss T</th>'
        '<th class="n">loss T′</th><th class="n">change</th><th>T continues</th><th>T′ '
        "continues</th></tr></thead><tbody>",
    ]
    for w in s.get("worst") or []:
        out.append(
            f"<tr><td class='n'>{w['index']}</td><td class='q'>{html.escape(w['text'])}</td>"
            f"<td class='n'>{c.fmt_num(w.get('loss_before'), 4)}</td><td "
            f"class='n'>{c.fmt_num(w.get('loss_after'), 4)}</td>"
            f"<td class='n'>{c.fmt_num(w.get('loss_change'), 4)}</td>"
            f"<td>{html.escape(w.get('before', ''))}</td>"
            f"<td>{html.escape(w.get('after', ''))}</td></tr>"
        )
    out.append("</tbody></table>")
    changed = s.get("changed") or []
    out.append(
        f"<h5>Changed continuations: {len(changed)} of {s.get('n_prompts', '?')} prompts "
        f"(locality {c.fmt_num(s.get('locality'), 3)})</h5>"
    )
    if not changed:
        out.append('<p class="graft-gen">every prompt continues exactly as before</p>')
        return "".join(out)
    out.append('<table class="graft-gen"><thead><tr><th>prompt</th><th>T</th><th>T′</th></tr></thead><tbody>')
    for g in changed:
        out.append(
            f"<tr><td class='q'><span style='white-space:nowrap'>#{g['index']}</span> "
            f"{html.escape(g.get('prompt', ''))}</td>"
            f"<td>{_diff_html(g.get('diff'), 'before')}</td>"
            f"<td>{_diff_html(g.get('diff'), 'after')}</td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


_MODEL_ORDER = (("target", "T"), ("transplanted", "T′"), ("donor", "D"))


def _ticks(tokens: list[str]) -> list[str]:
    """Token strings as axis labels, made unique by position (Plotly merges equal category labels)."""
    return [f"{i}:{html.escape(t.replace(' ', '·'), quote=False) or '∅'}" for i, t in enumerate(tokens)]


def _layer_ticks(layers: list[str], flagged: set[str]) -> list[str]:
    return [f"⚠ {lab}" if lab in flagged else lab for lab in layers]


def attribution_figure(envelope: dict) -> go.Figure:
    r = c.result_of(envelope)
    models = r.get("models") or {}
    unreliable = {k: set(v) for k, v in (r.get("unreliable") or {}).items()}
    any_flag = set().union(*unreliable.values()) if unreliable else set()
    diff = r.get("difference")
    panels = [
        (f"{short}: {models[k].get('label', k)}", models[k], unreliable.get(k, set()))
        for k, short in _MODEL_ORDER
        if k in models
    ]
    if diff:
        panels.append(
            ("T′ − T", diff, unreliable.get("target", set()) | unreliable.get("transplanted", set()))
        )
    titles = [p[0] for p in panels] + ["absolute attribution per layer: T vs T′"]
    n = len(panels) + 1
    fig = make_subplots(
        rows=n,
        cols=1,
        subplot_titles=titles,
        vertical_spacing=0.25 / n,
        row_heights=[1.0] * len(panels) + [0.8],
    )
    for i, (label, m, flagged) in enumerate(panels, start=1):
        mat = m.get("matrix") or [[]]
        signed_max = max((abs(v) for row in mat for v in row if c.is_number(v)), default=1.0) or 1.0
        fig.add_trace(
            go.Heatmap(
                z=mat,
                x=_ticks(m.get("tokens") or []),
                y=_layer_ticks(m.get("layers") or [], flagged),
                colorscale="RdBu",
                reversescale=True,
                zmid=0,
                zmin=-signed_max,
                zmax=signed_max,
                showscale=False,
                hovertemplate=f"{label}<br>%{{y}} · token %{{x}}<br>attribution %{{z:.4g}}<extra></extra>",
            ),
            row=i,
            col=1,
        )
        fig.update_yaxes(autorange="reversed", row=i, col=1)
    for key, short, colour in (("target", "T", c.TARGET), ("transplanted", "T′", c.TRANSPLANTED)):
        m = models.get(key)
        if m:
            layers = m.get("layers") or []
            rel = m.get("rel_deltas") or [None] * len(layers)
            fig.add_trace(
                go.Bar(
                    x=_layer_ticks(layers, any_flag),
                    y=m.get("layer_abs_totals"),
                    name=short,
                    marker_color=colour,
                    customdata=[c.fmt_num(v, 3) for v in rel],
                    marker_pattern_shape=["/" if lab in unreliable.get(key, set()) else "" for lab in layers],
                    hovertemplate=f"{short}: %{{x}} · Σ|attribution| %{{y:.4g}}"
                    "<br>|delta| / |F(x) − F(b)| %{customdata}<extra></extra>",
                ),
                row=n,
                col=1,
            )
    t = models.get("target") or {}
    flagged = [lab for lab in (t.get("layers") or []) if lab in any_flag]
    deltas = (
        f"max |delta| / |F(x) − F(b)| {c.fmt_num(r.get('max_rel_delta'), 3)} (tolerance "
        f"{c.fmt_num(r.get('tolerance'), 3)}) · "
        + (
            f"⚠ unreliable: {', '.join(flagged[:6])}{' …' if len(flagged) > 6 else ''}"
            if flagged
            else "every layer converged"
        )
    )
    what = "first-token logit" if r.get("objective") == "first-token" else "answer log-probability"
    sub = (
        f"{_source_label(r)} · Q: {html.escape(str(r.get('question', ''))[:70])} → "
        f"{html.escape(str(r.get('answer', '')))}"
        f"<br>{what}: F(x) − F(baseline) = "
        f"{c.fmt_num((t.get('f_input') or 0) - (t.get('f_baseline') or 0), 4)} "
        f"for T · {r.get('steps')}–{r.get('max_steps', r.get('steps'))} steps · {deltas}"
        f"<br>baseline: {html.escape(str(r.get('baseline_text', r.get('baseline', ''))))}"
    )
    c.apply_layout(
        fig,
        _title(envelope, "T13", "Attribution before / after"),
        sub,
        height=260 * n + 80,
        filename=c.download_filename(envelope, "T13", "attribution"),
        barmode="group",
        legend=dict(orientation="h", yanchor="top", y=-0.04, xanchor="left", x=0),
        margin=dict(l=90, r=30, t=160, b=80),
    )
    return fig
