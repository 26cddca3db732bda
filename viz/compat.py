"""T1 Compatibility report: architecture fields side by side, and a verdict per operation."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import common as c

OPERATIONS = {
    "module_swap": "Module swap",
    "organ_direct": "Organ transplant, direct",
    "organ_bridged": "Organ transplant, bridged",
    "conjugation": "Rank-k conjugation",
}

FIELD_LABELS = {
    "family": "family",
    "model_type": "model type",
    "n_layers": "layers",
    "hidden_size": "hidden size",
    "n_heads": "attention heads",
    "n_kv_heads": "KV heads",
    "head_dim": "head dim",
    "intermediate_size": "intermediate (MLP) size",
    "norm_type": "norm",
    "activation": "activation",
    "positional": "positional scheme",
    "vocab_size": "vocabulary size",
    "tied_embeddings": "tied embeddings",
    "dtype": "dtype",
    "n_params": "parameters",
}


def _status(equal: Any) -> tuple[str, str, str]:
    """(text, font colour, fill colour) of an equal / not-equal cell."""
    if equal is None:
        return "—", c.MUTED, c.NEUTRAL_FILL
    return (c.CHECK, c.GOOD, c.GOOD_FILL) if equal else (c.CROSS, c.BAD, c.BAD_FILL)


def _arch_rows(r: dict) -> list[tuple[str, str, str, Any, str]]:
    """(field, donor, target, equal, status override) rows of the architecture table."""
    rows: list[tuple[str, str, str, Any, str]] = []
    for f in r.get("fields") or []:
        name = str(f.get("field", ""))
        rows.append(
            (
                FIELD_LABELS.get(name, name),
                c.fmt_value(f.get("donor")),
                c.fmt_value(f.get("target")),
                f.get("equal"),
                "",
            )
        )
    if "tokenizer_overlap" in r or "same_tokenizer" in r:
        ov = r.get("tokenizer_overlap")
        same = r.get("same_tokenizer")
        mark = _status(same)[0]
        rows.append(
            (
                "tokenizer (Jaccard overlap of token strings)",
                "",
                "",
                same,
                f"{mark}  {'identical' if same else 'overlap ' + c.fmt_num(ov, 3)}",
            )
        )
    sig = r.get("signature") or {}
    if sig:
        rows.append(
            (
                "compatibility signature",
                str(sig.get("donor", "—")),
                str(sig.get("target", "—")),
                sig.get("equal"),
                "",
            )
        )
        if "donor_blocks" in sig or "target_blocks" in sig:
            db, tb = sig.get("donor_blocks"), sig.get("target_blocks")
            rows.append(
                (
                    "block-internals signature",
                    str(db or "—"),
                    str(tb or "—"),
                    None if db is None or tb is None else db == tb,
                    "",
                )
            )
    return rows


def compat_figure(envelope: dict) -> go.Figure:
    r = c.result_of(envelope)
    donor, target = c.model_names(envelope)
    rows = _arch_rows(r)
    n_ops = max(len(r.get("verdicts") or {}), 1)
    # Size each table to its rows so the figure has no blank band under the tables.
    h_arch, h_ops = 40 + 26 * len(rows) + 10, 30 + 34 * n_ops + 10
    fig = make_subplots(
        rows=2,
        cols=1,
        specs=[[{"type": "table"}], [{"type": "table"}]],
        row_heights=[h_arch / (h_arch + h_ops), h_ops / (h_arch + h_ops)],
        vertical_spacing=0.05,
        subplot_titles=("Architecture", "Verdict per transplant operation"),
    )

    # --- architecture table --------------------------------------------------------------
    status = [_status(eq) for *_, eq, _o in rows]
    status_text = [o or s[0] for (_f, _d, _t, _e, o), s in zip(rows, status)]
    status_font = [s[1] for s in status]
    row_fill = [s[2] for s in status]
    fig.add_trace(
        go.Table(
            columnwidth=[2.2, 2.0, 2.0, 1.1],
            header=dict(
                values=[
                    "<b>field</b>",
                    f"<b>donor</b><br>{donor}",
                    f"<b>target</b><br>{target}",
                    "<b>equal</b>",
                ],
                fill_color=c.HEADER_FILL,
                align="left",
                font=dict(size=13),
                height=40,
            ),
            cells=dict(
                values=[[x[0] for x in rows], [x[1] for x in rows], [x[2] for x in rows], status_text],
                fill_color=[["white"] * len(rows), ["white"] * len(rows), ["white"] * len(rows), row_fill],
                font=dict(size=12, color=[["#222222"] * len(rows)] * 3 + [status_font]),
                align=["left", "left", "left", "center"],
                height=26,
            ),
        ),
        row=1,
        col=1,
    )

    # --- verdicts ------------------------------------------------------------------------
    verdicts = r.get("verdicts") or {}
    reasons = r.get("reasons") or {}
    ops = list(verdicts) + [k for k in reasons if k not in verdicts]
    v_text, v_font, v_fill, reason_text = [], [], [], []
    for op in ops:
        v = verdicts.get(op)
        mark, colour, fill = _status(v)
        v_text.append("—" if v is None else f"{mark}  {'possible' if v else 'not possible'}")
        v_font.append(colour)
        v_fill.append(fill)
        rs = reasons.get(op) or []
        reason_text.append("<br>".join(f"• {x}" for x in rs) if rs else "—")
    labels = [OPERATIONS.get(op, op.replace("_", " ").capitalize()) for op in ops]
    fig.add_trace(
        go.Table(
            columnwidth=[1.6, 1.2, 5.0],
            header=dict(
                values=["<b>operation</b>", "<b>verdict</b>", "<b>reasons</b>"],
                fill_color=c.HEADER_FILL,
                align="left",
                font=dict(size=13),
                height=30,
            ),
            cells=dict(
                values=[labels, v_text, reason_text],
                fill_color=[v_fill, v_fill, ["white"] * len(ops)],
                font=dict(size=12, color=[v_font, v_font, ["#222222"] * len(ops)]),
                align="left",
                height=30,
            ),
        ),
        row=2,
        col=1,
    )

    # --- title ---------------------------------------------------------------------------
    parts = []
    if "tokenizer_overlap" in r:
        parts.append(f"tokenizer overlap (Jaccard) {c.fmt_num(r.get('tokenizer_overlap'), 3)}")
    if "same_tokenizer" in r:
        parts.append(f"same tokenizer: {c.fmt_num(r.get('same_tokenizer'))}")
    if "swappable_modules" in r or "shared_modules" in r:
        parts.append(
            f"{c.fmt_num(r.get('swappable_modules'))} of {c.fmt_num(r.get('shared_modules'))} "
            "shared linear modules swappable"
        )
    n_ok = sum(1 for v in verdicts.values() if v)
    if verdicts:
        parts.append(f"{n_ok} of {len(verdicts)} operations possible")
    c.apply_layout(
        fig,
        c.envelope_title(envelope, "T1", "Compatibility report"),
        " · ".join(parts),
        height=h_arch + h_ops + 190,
        filename=c.download_filename(envelope, "T1", "compat"),
        margin=dict(l=20, r=20, t=110, b=20),
    )
    return fig
