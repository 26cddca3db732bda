"""Compare: T, T' and D of one transplant run (module swap or conjugation): metric cards with changes, bars,
and the
held-out answers side by side with the words the transplant changed marked."""

from datetime import datetime

import streamlit as st

from ui.entry import require_app_entry  # streamlit only: light

# Outside app.py's router (a fresh server's first run, an AppTest of this file) app.py runs in
# this page's place, before the engine is imported here (the imports below are after it on purpose).
require_app_entry()

import viz  # noqa: E402
from engine.api import (
    SCORES,  # noqa: E402
    jsonsafe,  # noqa: E402
)
from ui.jobs import file_stem, tool_panel  # noqa: E402
from ui.transplant import COMPARE_RUN, latest_swap_id, swap_envelope, swap_runs, transplant_actions  # noqa: E402
from ui.verdict import run_inputs  # noqa: E402
from viz.compare import SCORE_LABELS, compare_figure, conjugate_figure, generations_html, metric_rows  # noqa: E402
from viz.report import build_report  # noqa: E402

GENERATIONS_SHOWN = 500  # answers drawn on the page; the report and the JSON hold them all


def _fmt(v) -> str:
    if v is None:
        return "—"
    return f"{v:,.2f}" if abs(v) >= 100 else f"{v:.3f}"


def _label(row: dict) -> str:
    r = row.get("params") or {}
    k = (r.get("params") or {}).get("k", "?")
    when = datetime.fromtimestamp(row["created"]).strftime("%Y-%m-%d %H:%M")
    if row["tool"] == "organ-insert":
        return f"organ · {row.get('donor') or 'organ'} → {row['target']} · {when} · {row['id']}"
    if row["tool"] == "conjugate":
        return f"conjugation · {row['donor']} → {row['target']} · k={k or 'full'} · {when} · {row['id']}"
    return f"{row['donor']} → {row['target']} · K={k} · {when} · {row['id']}"


st.title("Compare")
runs = swap_runs()
if not runs:
    st.info(
        "No transplant yet. Run **T11 Module swap** on the Transplant page, or the **rank-k conjugation** "
        "on the Concept page; its T, T′ and D appear here.",
        icon=":material/info:",
    )
    st.page_link("pages/transplant.py", label="Go to Transplant", icon=":material/biotech:")
    st.stop()

by_id = {r["id"]: r for r in runs}
wanted = st.query_params.get("run") or st.session_state.get(COMPARE_RUN) or latest_swap_id()
if st.session_state.get("compare_pick") not in by_id:
    st.session_state["compare_pick"] = wanted if wanted in by_id else runs[0]["id"]
left, right = st.columns([3, 1], vertical_alignment="bottom")
run_id = left.selectbox(
    "Transplant run", list(by_id), key="compare_pick", format_func=lambda i: _label(by_id[i])
)
envelope = swap_envelope(run_id)
if envelope is None:
    st.warning("That run is no longer in the history.")
    st.stop()
result = envelope["result"]
if envelope.get("tool") == "organ-insert":  # an organ transplant: its own figure, then the same T' actions
    from ui.organs import organ_compare

    organ_compare(run_id, envelope)
    st.stop()
kind = right.segmented_control(
    "Task score",
    SCORES,
    key="compare_score",
    default=result.get("score_kind", "graded"),
    help="graded: mean probability of the reference answer's tokens (defined even when "
    "a model never says it); exact: the greedy answer contains the reference.",
)
kind = kind or result.get("score_kind", "graded")
if envelope.get("tool") == "conjugate":
    what = f"Modules conjugated: {result.get('n_conjugated')} of {result.get('n_modules')}" + (
        f" · **rolled back automatically**: {result.get('roll_back_reason')}"
        if result.get("rolled_back")
        else ""
    )
else:
    what = f"Modules swapped: {result.get('k')} ({result.get('selection')})."
st.caption(
    f"Task score shown: **{SCORE_LABELS[kind]}**, on {result.get('n_test_items', '?')} held-out questions. "
    + what
)

cards = metric_rows(result, kind)
cols = st.columns(4) + st.columns([1, 1, 2])[:2]  # T′ against T and D, then TIR and Recovery
for col, card in zip(cols, cards):
    delta = card["delta"]
    extra = []
    if card.get("before") is not None:
        extra.append(f"T {_fmt(card['before'])}")
    if card.get("donor") is not None:
        extra.append(f"D {_fmt(card['donor'])}")
    col.metric(
        f"{card['label']} (T′)" if card.get("before") is not None else card["label"],
        _fmt(card["value"]) if card["value"] is not None else "undefined",
        delta=None if delta is None else f"{delta:+.3g} vs T",
        delta_color="inverse" if card["lower_is_better"] else "normal",
        help=card["help"] + (f"  \n{card['note']}" if card.get("note") else ""),
        border=True,
    )
    if extra:
        col.caption(" · ".join(extra))
    if card.get("note"):
        col.caption(card["note"])

fig = (
    conjugate_figure(envelope, kind)
    if envelope.get("tool") == "conjugate"
    else compare_figure(envelope, kind)
)
st.plotly_chart(fig, config=viz.download_config(fig), key=f"compare-fig-{run_id}-{kind}")

st.markdown("#### Answers to the held-out questions")
only = st.toggle("Only answers the transplant changed", key="compare_only_changed")
st.html(generations_html(envelope, only_changed=only, limit=GENERATIONS_SHOWN))

transplant_actions(run_id, envelope, where="compare")

stem = file_stem(envelope)
a, b, rep, _ = st.columns([1, 1, 1, 1])
a.download_button(
    "Result JSON",
    data=jsonsafe.dumps(envelope, indent=2),
    file_name=f"{stem}.json",
    mime="application/json",
    key=f"compare-json-{run_id}",
    icon=":material/download:",
    on_click="ignore",
    width="stretch",
)
b.download_button(
    "Figure HTML",
    data=lambda: viz.figure_html(fig),
    file_name=f"{stem}-compare-{kind}.html",
    mime="text/html",
    key=f"compare-html-{run_id}-{kind}",
    icon=":material/download:",
    on_click="ignore",
    width="stretch",
)
rep.download_button(
    "Build report",
    data=lambda: build_report(run_id),
    file_name=f"{stem}-report.html",
    mime="text/html",
    key=f"compare-report-{run_id}",
    icon=":material/summarize:",
    on_click="ignore",
    width="stretch",
    help="One self-contained HTML file (opens offline, prints to PDF): models and hashes, pre-surgery "
    "checks, surgery card, before/after numbers, T12/T13 figures, answers side by side, environment.",
)

st.markdown("#### lm-evaluation-harness")
with st.container(border=True):
    tool_panel(
        "lm-eval",
        inputs=run_inputs(run_id, by_id.get(run_id)),
        how_to_read="each panel is one task's metric for T and T′, with the harness's standard error as "
        "the error bar: the perplexities (lower is better) on the retained set, the general held-out "
        "corpus and the concept answers, and the exact-match share of the concept questions.",
    )
