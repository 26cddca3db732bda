"""Compare page figures: T, T' and D of one module-swap run (T11 result envelope).

* :func:`compare_figure`: bars of perplexities (log scale), the chosen task score and the
  alignment with D, with TIR and Recovery under that score in the subtitle.
* :func:`metric_rows`: the numbers of the metric cards (value of T', change from T, donor value),
  read from the result; nothing is computed beyond the difference shown on a card.
* :func:`generations_html`: the held-out questions with the three models' answers side by side,
  the engine's word diff (T -> T') marked, and whether each answer contains the reference.
"""

from __future__ import annotations

import html
from typing import Any, Optional

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import common as c

SCORE_LABELS = {
    "graded": "graded score (mean answer-token probability)",
    "exact": "exact score (greedy answer contains the reference)",
}
_MODELS = (
    ("before", "T (target)", "target"),
    ("after", "T′ (transplanted)", "transplanted"),
    ("donor", "D (donor)", "donor"),
)


def transfer_of(result: dict, kind: str) -> dict:
    """TIR / Recovery of ``kind`` from the result (older results carry only the run's own kind)."""
    tr = (result.get("transfer") or {}).get(kind)
    if tr:
        return tr
    if result.get("score_kind", "graded") == kind:
        return {
            k: result.get(k)
            for k in ("tir", "recovery", "tir_status", "recovery_status", "tir_note", "recovery_note")
        }
    return {
        "tir": None,
        "recovery": None,
        "tir_note": f"this run did not record TIR under the {kind} score",
        "recovery_note": f"this run did not record Recovery under the {kind} score",
    }


def _alignment(result: dict, key: str) -> Optional[float]:
    return {"before": result.get("alignment_before"), "after": result.get("alignment_after"), "donor": 1.0}[
        key
    ]


def compare_figure(
    envelope: dict, kind: str = "graded", *, title: Optional[str] = None, subtitle: Optional[str] = None
) -> go.Figure:
    r = c.result_of(envelope)
    fig = make_subplots(
        rows=1,
        cols=3,
        column_widths=[0.42, 0.29, 0.29],
        horizontal_spacing=0.08,
        subplot_titles=[
            "perplexity (log scale, lower is better)",
            f"task score: {kind}",
            "alignment score: agreement with D",
        ],
    )
    score_key = f"task_score_{kind}"
    for key, label, colour in _MODELS:
        m = r.get(key) if isinstance(r.get(key), dict) else {}
        panels = (
            (1, ["concept facts", "retained set"], [m.get("ppl_concept"), m.get("ppl_retained")]),
            (2, ["held-out questions"], [m.get(score_key)]),
            (
                3,
                ["next words" if r.get("alignment_note", "").startswith("word level") else "next tokens"],
                [_alignment(r, key)],
            ),
        )
        for col, xs, ys in panels:
            fig.add_trace(
                go.Bar(
                    x=xs,
                    y=ys,
                    name=label,
                    legendgroup=key,
                    showlegend=col == 1,
                    marker_color=c.MODEL_COLOURS[colour],
                    text=[f"{y:.4g}" if c.is_number(y) else "—" for y in ys],
                    textposition="outside",
                    textfont=dict(size=10),
                    hovertemplate=f"{label}<br>%{{x}}: %{{y:.5g}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    tr = transfer_of(r, kind)
    tir = f"TIR {c.fmt_num(tr.get('tir'), 3)}" if tr.get("tir") is not None else "TIR undefined"
    rec = (
        f"Recovery {c.fmt_num(tr.get('recovery'), 3)}"
        if tr.get("recovery") is not None
        else "Recovery undefined"
    )
    mods = r.get("modules") or []
    sub = subtitle or (
        f"{tir} · {rec} ({kind} score) · {len(mods)} modules swapped · "
        f"{r.get('n_test_items', '?')} held-out questions"
    )
    c.apply_layout(
        fig,
        title or c.envelope_title(envelope, "T11", "Before / after: T, T′ and D"),
        sub,
        height=480,
        filename=c.download_filename(envelope, "T11", f"compare-{kind}"),
        barmode="group",
        legend=dict(orientation="h", yanchor="top", y=-0.14, xanchor="left", x=0),
        margin=dict(l=70, r=30, t=120, b=110),
    )
    fig.update_yaxes(type="log", dtick=1, title_text="perplexity", row=1, col=1)  # decades only
    fig.update_yaxes(range=[0, 1.12], title_text="score", row=1, col=2)
    fig.update_yaxes(range=[0, 1.12], title_text="agreement", row=1, col=3)
    notes = [n for n in (tr.get("tir_note"), tr.get("recovery_note")) if n]
    if notes:
        c.note(fig, " · ".join(notes), y=-0.3)
    return fig


def metric_rows(result: dict, kind: str) -> list[dict[str, Any]]:
    """Cards: label, value (T'), delta (T' − T, or None), donor value, whether lower is better, help."""
    b, a, d = (result.get(k) or {} for k in ("before", "after", "donor"))
    score_key = f"task_score_{kind}"
    rows = [
        (
            "Concept perplexity",
            "ppl_concept",
            True,
            "Perplexity on the concept facts, token-weighted (lower = knows them).",
        ),
        (
            "Retained perplexity",
            "ppl_retained",
            True,
            "Perplexity on the retained general set: what the target must keep.",
        ),
        (
            f"{kind.capitalize()} task score",
            score_key,
            False,
            SCORE_LABELS[kind].capitalize() + " on the held-out questions.",
        ),
    ]
    out = []
    for label, key, lower, help_text in rows:
        out.append(
            {
                "label": label,
                "value": a.get(key),
                "before": b.get(key),
                "donor": d.get(key),
                "delta": _diff(a.get(key), b.get(key)),
                "lower_is_better": lower,
                "help": help_text,
            }
        )
    al_b, al_a = result.get("alignment_before"), result.get("alignment_after")
    out.append(
        {
            "label": "Alignment score with D",
            "value": al_a,
            "before": al_b,
            "donor": 1.0,
            "delta": _diff(al_a, al_b),
            "lower_is_better": False,
            "help": "Share of prompt positions where the model's greedy next token equals the donor's (D = "
            "1); across tokenizers, its greedy next word at every word end.",
        }
    )
    tr = transfer_of(result, kind)
    out.append(
        {
            "label": f"TIR ({kind})",
            "value": tr.get("tir"),
            "before": None,
            "donor": None,
            "delta": None,
            "lower_is_better": False,
            "note": tr.get("tir_note") or "",
            "help": "Transplant improvement ratio S(T′) / S(T); 1 = no change.",
        }
    )
    out.append(
        {
            "label": f"Recovery ({kind})",
            "value": tr.get("recovery"),
            "before": None,
            "donor": None,
            "delta": None,
            "lower_is_better": False,
            "note": tr.get("recovery_note") or "",
            "help": "(S(T′) − S(T)) / (S(D) − S(T)): share of the donor's advantage that moved; 1 = all of "
            "it.",
        }
    )
    return out


def _diff(a: Any, b: Any) -> Optional[float]:
    return a - b if c.is_number(a) and c.is_number(b) else None


_CSS = """
<style>
.graft-gen {border-collapse: collapse; width: 100%%; font-size: 0.86rem; font-family: %s;}
.graft-gen th {background: %s; text-align: left; padding: 6px 8px; position: sticky; top: 0;}
.graft-gen td {border-top: 1px solid %s; padding: 6px 8px; vertical-align: top; overflow-wrap: anywhere;}
.graft-gen td.q {width: 22%%; color: #333;}
.graft-gen td.n, .graft-gen th.n {white-space: nowrap; overflow-wrap: normal; width: 1%%; text-align: right;}
.graft-gen .ref {color: %s; font-size: 0.78rem;}
.graft-gen del {background: %s; color: #8c1d18; text-decoration: line-through;}
.graft-gen ins {background: %s; color: #14532d; text-decoration: none; font-weight: 600;}
.graft-gen .ok {color: %s; font-weight: 700;} .graft-gen .no {color: %s; font-weight: 700;}
.graft-gen .same {color: %s; font-size: 0.75rem;}
</style>
""" % (c.FONT_FAMILY, c.HEADER_FILL, c.GRID, c.MUTED, c.BAD_FILL, c.GOOD_FILL, c.GOOD, c.BAD, c.MUTED)


def _mark(ok: Any) -> str:
    return (
        f'<span class="ok" title="contains the reference">{c.CHECK}</span>'
        if ok
        else f'<span class="no" title="does not contain the reference">{c.CROSS}</span>'
    )


def _diff_html(runs: list, side: str) -> str:
    """``side`` "before": equal + deleted words; "after": equal + inserted words."""
    parts = []
    for op, text in runs or []:
        t = html.escape(text)
        if op == "equal":
            parts.append(t)
        elif op == "delete" and side == "before":
            parts.append(f"<del>{t}</del>")
        elif op == "insert" and side == "after":
            parts.append(f"<ins>{t}</ins>")
    return "".join(parts)


def generations_html(envelope: dict, only_changed: bool = False, limit: Optional[int] = None) -> str:
    """An HTML table: question + reference, then T, T' and D answers. Words T' changed are
    marked (struck in T, highlighted in T'), with ✓/✗ for containing the reference. With
    ``limit``, the first ``limit`` rows and a line saying how many there are (the app's page stays
    light on a concept set of thousands of questions; the report shows them all)."""
    r = c.result_of(envelope)
    rows = [g for g in (r.get("generations") or []) if not only_changed or g.get("changed")]
    if not rows:
        what = (
            "no answer changed" if only_changed and r.get("generations") else "no generations in this result"
        )
        return _CSS + f'<p class="graft-gen">{what}</p>'
    out = [_CSS]
    if limit is not None and len(rows) > limit:
        out.append(
            f'<p class="graft-gen">The first {limit:,} of {len(rows):,} answers; the HTML report and the '
            "run's JSON hold them all.</p>"
        )
        rows = rows[:limit]
    out.append(
        '<table class="graft-gen"><thead><tr><th>question (reference)</th><th>T (target)</th>'
        "<th>T′ (transplanted)</th><th>D (donor)</th></tr></thead><tbody>"
    )
    for g in rows:
        diff = g.get("diff")
        t_html = _diff_html(diff, "before") if diff else html.escape(g.get("target", ""))
        tp_html = _diff_html(diff, "after") if diff else html.escape(g.get("transplanted", ""))
        same = "" if g.get("changed") else '<div class="same">unchanged</div>'
        out.append(
            f'<tr><td class="q">{html.escape(g.get("question", ""))}<div class="ref">reference: '
            f"{html.escape(str(g.get('reference', '')))}</div></td>"
            f"<td>{_mark(g.get('target_correct'))} {t_html}</td>"
            f"<td>{_mark(g.get('transplanted_correct'))} {tp_html}{same}</td>"
            f"<td>{_mark(g.get('donor_correct'))} {html.escape(g.get('donor', ''))}</td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def conjugate_figure(envelope: dict, kind: Optional[str] = None) -> go.Figure:
    """A conjugation run: T, T′ and D as for a swap, with the maps each side used, the interference
    check and whether T′ was rolled back automatically in the subtitle."""
    r = c.result_of(envelope)
    kind = kind or r.get("score_kind") or "graded"
    tr = transfer_of(r, kind)
    tir = f"TIR {c.fmt_num(tr.get('tir'), 3)}" if tr.get("tir") is not None else "TIR undefined"
    rec = (
        f"Recovery {c.fmt_num(tr.get('recovery'), 3)}"
        if tr.get("recovery") is not None
        else "Recovery undefined"
    )
    counts = r.get("map_counts") or {}

    def maps(side: str) -> str:
        got = counts.get(side) or {}
        return " / ".join(f"{k} {v}" for k, v in got.items() if v) or "—"

    inter = r.get("interference") or {}
    change = inter.get("ppl_change_fraction")
    status = f"ROLLED BACK: {r.get('roll_back_reason')}" if r.get("rolled_back") else "kept"
    sub = (
        f"{tir} · {rec} ({kind}) · {r.get('n_conjugated', '?')} modules · inputs: {maps('input')} · "
        f"outputs: {maps('output')}<br>retained perplexity "
        f"{'%+.1f%%' % (100 * change) if c.is_number(change) else '—'} · locality "
        f"{c.fmt_num(inter.get('locality'), 3) if c.is_number(inter.get('locality')) else '—'} · {status}"
    )
    return compare_figure(
        envelope,
        kind,
        title=c.envelope_title(envelope, "OP3", "Rank-k conjugation: T, T′ and D"),
        subtitle=sub,
    )
