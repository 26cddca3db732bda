"""Verdict page (pages/verdict.py), driven headless with AppTest: with no transplant it says where to
start; with a finished tiny swap run in the history it runs T12 and T13 on that run (rebuilt from
the history) and shows the figures, the stability checks and the worst-hit table."""

from __future__ import annotations

from tests.test_app import open_app, run_until, texts


def _charts(n):
    return lambda at: len(at.get("plotly_chart")) >= n


def test_verdict_without_runs_says_where_to_start():
    at = open_app("pages/verdict.py")
    assert not at.exception and not at.error, texts(at.error)
    assert "No finished transplant yet" in texts(at.info)


def test_verdict_runs_t12_and_t13_on_a_history_run(tiny_run):
    at = open_app("pages/verdict.py")
    assert at.selectbox(key="verdict_run").value == tiny_run["run_id"]
    at.button(key="run-interference").click().run()
    run_until(at, _charts(1), timeout=120)
    assert not at.exception and not at.error, texts(at.error)
    ok = texts(at.success)
    assert "Applied twice" in ok and "Saved and reloaded" in ok, ok
    page_html = "\n".join(h.proto.body for h in at.html)
    assert "Worst hit" in page_html and "Changed continuations" in page_html
    at.number_input(key="param-attribution-steps").set_value(4).run()
    at.button(key="run-attribution").click().run()
    run_until(at, _charts(2), timeout=120)
    assert not at.exception and not at.error, texts(at.error)
    captions = texts(at.caption)
    assert "convergence delta" in captions and "replaced by" in captions  # the baseline in words
    # The page says what the run found: every layer converged, or the flagged layers by name.
    from engine.running.history import History

    hist = History()
    run = next(r for r in hist.list() if r["tool"] == "attribution" and r["status"] == "done")
    flagged = {
        k: v for k, v in (hist.get(run["id"])["result"]["result"].get("unreliable") or {}).items() if v
    }
    converged_line = "every layer of every model converged" in captions
    assert converged_line == (not flagged)
    warning = texts(at.warning)
    assert ("Not converged" in warning) == bool(flagged)
    for model, layers in flagged.items():
        assert f"{model}: {', '.join(map(str, layers))}" in warning
