"""The surgery report (viz/report.py, ``python -m engine report``): one self-contained HTML file
from a tiny swap run recorded in the run history."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.loading.models import ModelSpec
from engine.running.history import History, new_run_id
from engine.running.runner import run_tool
from viz.report import SECTIONS, build_report, write_report

ROOT = Path(__file__).resolve().parent.parent
PAIR = ("tiny-gpt2-a", "tiny-gpt2-b")


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _record(history: History, env: dict, tool: str, inputs: dict) -> str:
    """Record a finished run as the CLI does (envelope with its run_id; inputs in the params)."""
    run_id = new_run_id("test-")
    history.create(
        run_id, tool, tool, env.get("donor") or "", env.get("target") or "", {"inputs": inputs}, source="cli"
    )
    history.start(run_id)
    env = dict(env, run_id=run_id)
    history.finish(run_id, "done", result=env)
    return run_id


@pytest.fixture
def swap_run(home, sets, workload):
    history = History()
    d, t = (ModelSpec.parse(x) for x in PAIR)
    env = run_tool("swap", d, t, options={"workload": workload}, params={"k": 3, **sets})
    run_id = _record(history, env, "swap", {"donor": PAIR[0], "target": PAIR[1]})
    compat = run_tool("compat", d, t, options={"workload": workload})
    compat_id = _record(history, compat, "compat", {"donor": PAIR[0], "target": PAIR[1]})
    return {
        "history": history,
        "run_id": run_id,
        "env": env,
        "compat_id": compat_id,
        "d": d,
        "t": t,
        "workload": workload,
    }


def _section(html: str, title: str) -> str:
    sid = re.sub(r"[^a-z0-9._-]+", "-", title.lower()).strip("-.")
    m = re.search(rf'<section id="{re.escape(sid)}"><h2>{re.escape(title)}</h2>(.*?)</section>', html, re.S)
    assert m, f"section {title} missing"
    return m.group(1)


def test_report_has_every_section_and_no_external_resource(swap_run):
    html = build_report(swap_run["run_id"], swap_run["history"])
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    for title in SECTIONS:
        assert _section(html, title)
    # self-contained: no script/link/img/iframe pointing anywhere, plotly.js inlined exactly once
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", html, re.I)
    markup = re.sub(
        r"<script\b[^>]*>.*?</script>", "<script></script>", html, flags=re.S | re.I
    )  # code aside
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", markup, re.I)
    assert html.count("plotly.js v") == 1 and len(html) > 1_000_000
    assert "@media print" in html and "@page" in html


def test_report_numbers_match_the_run(swap_run):
    env, run_id = swap_run["env"], swap_run["run_id"]
    res = env["result"]
    html = build_report(run_id, swap_run["history"])
    embedded = json.loads(
        re.search(r"<script type='application/json' id='graft-run'>(.*?)</script>", html, re.S)
        .group(1)
        .replace("<\\/", "</")
    )
    assert embedded["result"] == json.loads(json.dumps(res)) and embedded["run_id"] == run_id
    numbers = _section(html, "Before and after")
    for side in ("before", "after", "donor"):
        for key in ("ppl_concept", "ppl_retained"):
            assert f">{res[side][key]:.4g}<" in numbers, (side, key)
    models = _section(html, "Models")
    assert res["weight_hash_before"] in models and res["weight_hash_after"] in models
    assert res["weight_hash_before"] != res["weight_hash_after"]
    done = _section(html, "What was done")
    card = json.loads(
        re.search(r"<pre>(.*?)</pre>", done, re.S)
        .group(1)
        .replace("&quot;", '"')
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#x27;", "'")
    )
    assert card == res["card"] and card["modules"] == [m["name"] for m in res["modules"]]
    gens = _section(html, "Generations")
    assert all(g["question"] in gens for g in res["generations"])
    env_section = _section(html, "Environment")
    assert "torch" in env_section and env["meta"]["device"] in env_section


def test_pre_surgery_checks_and_verdict_runs_come_from_the_history(swap_run):
    history, run_id = swap_run["history"], swap_run["run_id"]
    html = build_report(run_id, history)
    pre = _section(html, "Pre-surgery checks")
    assert swap_run["compat_id"] in pre  # the pair's T1 run is drawn
    assert (
        "Not run for this pair" in pre
        and "python -m engine cka --donor tiny-gpt2-a --target tiny-gpt2-b" in pre
    )
    verdict = _section(html, "Verdicts: interference, attribution, lm-eval")
    assert f"python -m engine interference --run {run_id}" in verdict and "graft-fig" not in verdict
    # any run recorded with input run = this run is drawn by its tool's own figure builder
    cka = run_tool("cka", swap_run["d"], swap_run["t"], options={"workload": swap_run["workload"]})
    other = _record(history, cka, "cka", {"run": "someone-else"})
    mine = _record(history, cka, "cka", {"run": run_id})
    verdict = _section(build_report(run_id, history), "Verdicts: interference, attribution, lm-eval")
    assert mine in verdict and other not in verdict and "graft-fig" in verdict
    from engine.core.errors import GraftError

    with pytest.raises(GraftError, match="is a cka run: the report covers a transplant run"):
        build_report(mine, history)  # a diagnostics run has no surgery to report (the Runs page offers none)


def test_unknown_or_unfinished_run_is_one_line(home, tmp_path):
    from engine.core.errors import GraftError

    history = History()
    with pytest.raises(GraftError, match="unknown run id"):
        build_report("no-such-run", history)
    history.create("queued-run", "swap", "swap", "a", "b", {})
    with pytest.raises(GraftError, match="queued"):
        write_report("queued-run", str(tmp_path / "r.html"), history)
    assert not (tmp_path / "r.html").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_swap_json_then_report_chains(home, sets, workload, tmp_path):
    out = tmp_path / "swap.json"
    proc = _cli(
        "swap",
        "--donor",
        PAIR[0],
        "--target",
        PAIR[1],
        "--k",
        "2",
        "--concept",
        sets["concept"],
        "--retained",
        sets["retained"],
        "--workload",
        workload,
        "--json",
        str(out),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(out.read_text())["run_id"]
    report = tmp_path / "report.html"
    proc = _cli("report", "--run", run_id, "--out", str(report), "--quiet")
    assert proc.returncode == 0, proc.stderr
    html = report.read_text()
    assert all(f"<h2>{t}</h2>" in html for t in SECTIONS) and run_id in html
    assert not list(tmp_path.glob(".report.html.*"))  # written atomically, no temporary left
    # unknown run id and an unwritable --out: exit 2, one line, nothing written
    proc = _cli("report", "--run", "no-such-run", "--out", str(tmp_path / "x.html"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown run id" in proc.stderr
    assert not (tmp_path / "x.html").exists()
    proc = _cli("report", "--run", run_id, "--out", str(tmp_path))  # a folder
    assert proc.returncode == 2 and proc.stderr.startswith("error: --out:")


def test_report_embeds_hostile_strings_inertly(swap_run):
    """A question holding "<!--<script>" used to swallow the embedded JSON's closing tag, and a donor
    folder named with tags became live markup (a mailto link, styled text) in the figure titles."""
    env = json.loads(json.dumps(swap_run["env"]))
    evil = "<!--<script>alert(1)</script> </script> & ]]> \u2028"
    env["result"]["generations"][0]["question"] = evil
    env["donor"] = "/m/p<b>B<a href='mailto:x@y.z'>m"
    run_id = _record(swap_run["history"], env, "swap", {"donor": env["donor"], "target": PAIR[1]})
    html = build_report(run_id, swap_run["history"])
    start = html.index("<script type='application/json' id='graft-run'>")
    body = html[start:].split(">", 1)[1]
    data, rest = body.split("</script>", 1)
    assert rest == "</body></html>" and "<" not in data and ">" not in data and "&" not in data
    embedded = json.loads(data)
    assert embedded["result"]["generations"][0]["question"] == evil and embedded["donor"] == env["donor"]
    assert "<a href='mailto" not in html and "&lt;a href='mailto:x@y.z'&gt;" in html  # the title, as text
