"""The surgery report (issue 9, part 4): ONE self-contained HTML file about one transplant run,
readable offline by someone who will never open the app, and printable to PDF.

Sections: the models and their weight hashes; the pre-surgery checks (the pair's latest T1-T4 and
go / no-go runs from the history, drawn by each tool's own figure builder); what was done (the
run's surgery card); the before / after numbers; T12 / T13 (any run in the history whose input
``run`` is this run, drawn by its registered figure builder); the generations side by side with
the changed words marked; the environment. Plotly's JavaScript is inlined once in the head; every
figure is a ``div`` that uses it. Nothing is computed here: numbers are read from the results.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from . import common as c
from .compare import generations_html, metric_rows, transfer_of

PRE_SURGERY = (
    ("compat", "T1 compatibility"),
    ("cka", "T2 layer similarity"),
    ("procrustes", "T3 Procrustes residuals"),
    ("bridge-check", "T4 bridge sufficiency"),
    ("go-no-go", "Go / no-go"),
)
VERDICT_TOOLS = (("interference", "T12 interference and stability"), ("attribution", "T13 attribution"))
SECTIONS = (
    "Models",
    "Pre-surgery checks",
    "What was done",
    "Before and after",
    "Verdicts: interference, attribution, lm-eval",
    "Generations",
    "Environment",
)
FIG_WIDTH = 980  # px; fits A4 landscape (the print page size) with its margins

_CSS = """
body {font-family: %(font)s; color: #222; margin: 0 auto; max-width: 1040px; padding: 24px; line-height:
1.45;}
h1 {font-size: 1.6rem; margin-bottom: 0.2rem;} h2 {font-size: 1.25rem; border-bottom: 2px solid %(header)s;
  padding-bottom: 4px; margin-top: 2rem;} h3 {font-size: 1.05rem; margin-bottom: 0.3rem;}
.sub {color: %(muted)s;} .muted {color: %(muted)s; font-size: 0.9rem;}
table.kv, table.num {border-collapse: collapse; margin: 0.5rem 0; font-size: 0.92rem;}
table.kv td, table.kv th, table.num td, table.num th {border: 1px solid %(grid)s; padding: 4px 8px;
text-align: left; overflow-wrap: anywhere;}
table.kv th, table.num th {background: %(header)s;} table.num td.n {text-align: right; font-variant-numeric:
tabular-nums;}
code, pre {font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.82rem;}
pre {background: #f7f7f7; padding: 8px; overflow-x: auto; white-space: pre-wrap; word-break: break-all;}
.graft-fig {margin: 0.6rem 0 1.2rem 0;} nav.toc a {margin-right: 12px;}
.go {color: %(good)s; font-weight: 700;} .nogo {color: %(bad)s; font-weight: 700;}
@page {size: A4 landscape; margin: 12mm;}
@media print {
  body {max-width: none; padding: 0; font-size: 10.5pt;} nav.toc {display: none;}
  h2 {break-after: avoid; page-break-after: avoid;} h3 {break-after: avoid;}
  .graft-fig, table, pre {break-inside: avoid; page-break-inside: avoid;}
  .graft-fig {zoom: 0.7;}  /* a 980 x 800 px figure then fits an A4 landscape page (about 1040 x 700 px) */
  section {break-before: auto;} a {color: inherit; text-decoration: none;}
  .modebar-container {display: none !important;}
}
""" % {
    "font": c.FONT_FAMILY,
    "header": c.HEADER_FILL,
    "muted": c.MUTED,
    "grid": c.GRID,
    "good": c.GOOD,
    "bad": c.BAD,
}


def _e(x: Any) -> str:
    return html.escape("—" if x is None else str(x))


def _num(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return _e(v) if not isinstance(v, bool) else ("yes" if v else "no")


def _kv(rows: list[tuple[str, Any]]) -> str:
    return (
        '<table class="kv">'
        + "".join(f"<tr><th>{_e(k)}</th><td>{v if isinstance(v, _Raw) else _e(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


class _Raw(str):
    """HTML already escaped."""


def figure_div(fig: Any) -> str:
    """A figure as a div + script drawing it with the page's one inlined plotly.js."""
    fig.update_layout(width=FIG_WIDTH, autosize=False)
    cfg = {"displaylogo": False, "responsive": False}
    return (
        '<div class="graft-fig">'
        + fig.to_html(full_html=False, include_plotlyjs=False, config=cfg)
        + "</div>"
    )


def _tool_figure(tool: str, envelope: dict) -> str:
    from . import figure_for

    try:
        return figure_div(figure_for(tool, envelope))
    except Exception as exc:  # a figure that cannot be drawn must not lose the rest of the report
        return (
            f'<p class="muted">The {_e(tool)} figure could not be drawn: {_e(type(exc).__name__)}: '
            f"{_e(exc)}</p>"
        )


# ------------------------------------------------------------------------------------ history look-ups
def _done(history: Any, limit: int = 2000) -> list[dict[str, Any]]:
    return [r for r in history.list(limit=limit) if r.get("status") == "done"]


def _run_input(row: dict[str, Any]) -> Optional[str]:
    return ((row.get("params") or {}).get("inputs") or {}).get("run")


def pre_surgery_runs(history: Any, run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The latest finished run of each pre-surgery tool on this run's pair (the target, and the
    donor, its base or its adapter on the other side), newest first in the history."""
    env = run.get("result") or {}
    sources = {x for x in (env.get("donor"), env.get("base"), env.get("adapter"), run.get("donor")) if x}
    target = env.get("target") or run.get("target")
    out: dict[str, dict[str, Any]] = {}
    wanted = {t for t, _ in PRE_SURGERY}
    for row in _done(history):
        if (
            row["tool"] in wanted
            and row["tool"] not in out
            and row.get("target") == target
            and row.get("donor") in sources
        ):
            full = history.get(row["id"])
            if full and full.get("result"):
                out[row["tool"]] = full
    return out


def verdict_runs(history: Any, run_id: str) -> list[dict[str, Any]]:
    """Finished runs whose input ``run`` is this run (T12, T13, ...), the latest of each tool."""
    out: dict[str, dict[str, Any]] = {}
    for row in _done(history):
        if row["tool"] not in out and row["id"] != run_id and _run_input(row) == run_id:
            full = history.get(row["id"])
            if full and full.get("result"):
                out[row["tool"]] = full
    return list(out.values())


# ------------------------------------------------------------------------------------------- sections
def _models(env: dict, res: dict) -> str:
    card = res.get("card") or {}
    hashes = card.get("hashes") or {}
    rows: list[tuple[str, Any]] = [("donor D", env.get("donor")), ("target T", env.get("target"))]
    for key in ("base", "adapter"):
        if env.get(key):
            rows.append((key, env.get(key)))
    rows += [
        ("weight hash of T", hashes.get("target") or res.get("weight_hash_before")),
        ("weight hash of T′ (transplanted)", hashes.get("transplanted") or res.get("weight_hash_after")),
    ]
    if hashes.get("donor"):
        rows.append(("weight hash of D", hashes.get("donor")))
    rows += [
        ("roll back bit-exact", res.get("rollback_bit_exact")),
        ("cached target untouched", res.get("target_untouched")),
        ("saved to", res.get("saved_to")),
    ]
    return _kv(rows)


def _pre_surgery(pre: dict[str, dict[str, Any]], env: dict) -> str:
    out = []
    d, t = env.get("donor") or env.get("base") or "DONOR", env.get("target") or "TARGET"
    for tool, title in PRE_SURGERY:
        row = pre.get(tool)
        out.append(f"<h3>{_e(title)}</h3>")
        if row is None:
            out.append(
                f'<p class="muted">Not run for this pair. Run: <code>python -m engine {tool} --donor '
                f"{_e(d)} "
                f"--target {_e(t)}</code> (or on the app's page), then build this report again.</p>"
            )
            continue
        out.append(f'<p class="muted">run {_e(row["id"])}, {_e(_when(row.get("finished")))}</p>')
        if tool == "go-no-go":
            out.append(_gonogo_lines(row["result"]))
        out.append(_tool_figure(tool, row["result"]))
    return "".join(out)


def _gonogo_lines(envelope: dict) -> str:
    r = envelope.get("result") or {}
    items = []
    for o in r.get("operations") or []:
        cls, word = ("go", "go") if o.get("go") else ("nogo", "no-go")
        items.append(
            f'<li><b>{_e(o.get("title"))}</b>: <span class="{cls}">{word}</span> — '
            + "; ".join(_e(x) for x in o.get("reasons") or [])
            + "</li>"
        )
    return f"<p><b>{_e(r.get('recommendation'))}</b></p><ul>{''.join(items)}</ul>"


def _what_was_done(run: dict, res: dict) -> str:
    card = res.get("card")
    rows: list[tuple[str, Any]] = [
        ("tool", f"{run.get('tool')} ({run.get('title')})"),
        ("run id", run.get("id")),
    ]
    if card:
        rows.append(("operation", card.get("operation")))
        mods = card.get("modules")
        if isinstance(mods, list):
            rows.append(
                (
                    "modules changed",
                    f"{len(mods)}: " + ", ".join(map(str, mods[:12])) + (" …" if len(mods) > 12 else ""),
                )
            )
        body = (
            _kv(rows)
            + "<h3>Surgery card (surgery.json)</h3><pre>"
            + _e(json.dumps(card, indent=2, allow_nan=False))
            + "</pre>"
        )
        return body
    return _kv(rows) + '<p class="muted">This run carries no surgery card (it is not a transplant run).</p>'


def _before_after(run: dict, env: dict, res: dict) -> str:
    if not isinstance(res.get("before"), dict):
        return '<p class="muted">This run has no before / after evaluation.</p>'
    kind = res.get("score_kind") or "graded"
    head = (
        "<tr><th>metric</th><th>T (target)</th><th>T′ (transplanted)</th><th>D (donor)</th><th>T′ − "
        "T</th></tr>"
    )
    body = []
    for m in metric_rows(res, kind):
        body.append(
            f"<tr><td>{_e(m['label'])}</td><td class='n'>{_num(m['before'])}</td><td "
            f"class='n'>{_num(m['value'])}</td>"
            f"<td class='n'>{_num(m['donor'])}</td><td class='n'>{_num(m['delta'])}</td></tr>"
        )
    other = "exact" if kind == "graded" else "graded"
    tr = transfer_of(res, other)
    body.append(
        f"<tr><td>TIR / Recovery ({other})</td><td></td><td class='n'>{_num(tr.get('tir'))} / "
        f"{_num(tr.get('recovery'))}</td><td></td><td></td></tr>"
    )
    notes = [
        n for n in (transfer_of(res, kind).get("tir_note"), transfer_of(res, kind).get("recovery_note")) if n
    ]
    table = f'<table class="num" id="numbers">{head}{"".join(body)}</table>'
    if notes:
        table += '<p class="muted">' + " · ".join(_e(n) for n in notes) + "</p>"
    return table + _tool_figure(run["tool"], env)


def _verdicts(verdicts: list[dict[str, Any]], run_id: str) -> str:
    if not verdicts:
        return (
            '<p class="muted">No T12 / T13 / lm-eval run reads this transplant yet. Run <code>python -m '
            "engine interference "
            f"--run {_e(run_id)}</code>, <code>python -m engine attribution --run {_e(run_id)}</code> "
            f"and <code>python -m engine lm-eval --run {_e(run_id)}</code> (or the app's Verdict and "
            "Compare pages), then build this report again.</p>"
        )
    out = []
    for row in verdicts:
        out.append(
            f"<h3>{_e(row.get('title') or row['tool'])}</h3><p class='muted'>run {_e(row['id'])}, "
            f"{_e(_when(row.get('finished')))}</p>" + _tool_figure(row["tool"], row["result"])
        )
    return "".join(out)


def _when(ts: Any) -> str:
    if not ts:
        return "—"
    return _dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S")


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def _environment(run: dict, env: dict) -> str:
    meta = env.get("meta") or {}
    opts = meta.get("options") or {}
    rows: list[tuple[str, Any]] = [
        ("device", meta.get("device")),
        ("dtype", opts.get("dtype")),
        ("time taken (history)", f"{run['duration_s']:.1f} s" if run.get("duration_s") is not None else None),
        ("of which loading / computing", f"{meta.get('load_seconds')} s / {meta.get('compute_seconds')} s"),
        ("run started / finished", f"{_when(run.get('started'))} / {_when(run.get('finished'))}"),
        ("recorded by", run.get("source")),
        ("workload", (meta.get("workload") or {}).get("name")),
        ("report built", _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")),
        ("python", platform.python_version()),
        (
            "torch / transformers / plotly",
            f"{_version('torch')} / {_version('transformers')} / {_version('plotly')}",
        ),
        ("platform", platform.platform()),
    ]
    return (
        _kv(rows)
        + '<p class="muted">Library versions are those of the environment that built this report.</p>'
    )


def build_report(run_id: str, history: Any = None) -> str:
    """The report of run ``run_id`` as one HTML string (GraftError for an unknown or unfinished run)."""
    import plotly.offline

    from engine.api import GraftError, History

    history = history or History()
    run = history.get(run_id)
    if run is None:
        raise GraftError(
            f"unknown run id {run_id!r}: list runs on the Runs page (or in the CLI envelopes' run_id)"
        )
    if run.get("status") != "done" or not run.get("result"):
        raise GraftError(f"run {run_id} is {run.get('status')}: only a finished run has a result to report")
    env = run["result"]
    res = env.get("result") or {}
    if not res.get("card"):  # as the Runs page: only a transplant run has a surgery to report
        raise GraftError(
            f"run {run_id} is a {run.get('tool') or env.get('tool')} run: the report covers a transplant "
            "run (module swap, conjugation, organ insertion) with the checks made for it"
        )
    pre = pre_surgery_runs(history, run)
    verdicts = verdict_runs(history, run_id)
    title = (
        f"Surgery report — {env.get('donor') or env.get('adapter') or env.get('base')} → {env.get('target')}"
    )
    bodies = {
        "Models": _models(env, res),
        "Pre-surgery checks": _pre_surgery(pre, env),
        "What was done": _what_was_done(run, res),
        "Before and after": _before_after(run, env, res),
        "Verdicts: interference, attribution, lm-eval": _verdicts(verdicts, run_id),
        "Generations": generations_html(env)
        if res.get("generations") is not None
        else '<p class="muted">This run recorded no generations.</p>',
        "Environment": _environment(run, env),
    }
    toc = " ".join(f'<a href="#{c.slug(s).lower()}">{_e(s)}</a>' for s in SECTIONS)
    sections = "".join(
        f'<section id="{c.slug(s).lower()}"><h2>{_e(s)}</h2>{bodies[s]}</section>' for s in SECTIONS
    )
    # Inside <script> the HTML parser ends or re-enters script data at "</script" and "<!--": every
    # "<", ">" and "&" is written as a JSON escape, so no string in the run can do either.
    data = (
        json.dumps(env, allow_nan=False)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style>"
        f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head><body>"
        f"<h1>{_e(title)}</h1><p class='sub'>Graft run {_e(run_id)} · {_e(run.get('title'))} · "
        f"finished {_e(_when(run.get('finished')))}</p><nav class='toc'>{toc}</nav>{sections}"
        f"<script type='application/json' id='graft-run'>{data}</script></body></html>"
    )


def write_report(run_id: str, out: str, history: Any = None) -> Path:
    """Build the report and write it to ``out`` atomically; the output path is checked first."""
    from engine.api import check_output_file, write_text_atomic

    check_output_file(out, "--out", "report.html")
    return write_text_atomic(out, build_report(run_id, history), "--out", "report.html")
