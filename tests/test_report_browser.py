"""The surgery report in a real browser: Debian's chromium through Playwright, every network request
blocked (and none attempted), every section visible, every figure drawn, and printed to PDF."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from docs.screenshots import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.browser]

REPORT_URL = "http://graft-report.invalid/report.html"  # served from memory by the route below, never fetched


@pytest.fixture
def report_html(home, sets, workload, one_thread):
    """A tiny swap run with its pair's T1 and go / no-go runs in the history, and its report."""
    from engine.loading.models import ModelSpec
    from engine.running.history import History
    from engine.running.runner import run_tool
    from tests.test_report import _record
    from viz.report import build_report

    history = History()
    d, t = ModelSpec.parse("tiny-gpt2-a"), ModelSpec.parse("tiny-gpt2-b")
    inputs = {"donor": d.ref, "target": t.ref}
    for tool in ("compat", "go-no-go"):
        _record(history, run_tool(tool, d, t, options={"workload": workload}), tool, inputs)
    run_id = _record(
        history,
        run_tool("swap", d, t, options={"workload": workload}, params={"k": 3, **sets}),
        "swap",
        inputs,
    )
    return build_report(run_id, history)


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():  # never skipped silently
        pytest.fail(
            f"no chromium at {CHROMIUM}: run `apt-get install chromium`, or deselect with -m 'not browser'",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_report_opens_offline_shows_every_section_and_prints(report_html, browser, tmp_path):
    from playwright.sync_api import expect

    from viz.report import SECTIONS

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    attempted: list[str] = []

    def handle(route):
        if route.request.url == REPORT_URL:
            route.fulfill(status=200, content_type="text/html; charset=utf-8", body=report_html)
        else:
            attempted.append(route.request.url)
            route.abort()

    page.route("**/*", handle)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(REPORT_URL, timeout=60_000)
    for title in SECTIONS:
        expect(page.get_by_role("heading", name=title, exact=True, level=2)).to_be_visible()
    n_figs = page.locator(".graft-fig").count()
    assert n_figs >= 3  # T1, go / no-go and the swap's own figure
    expect(page.locator(".graft-fig .js-plotly-plot .main-svg").nth(n_figs - 1)).to_be_attached(
        timeout=30_000
    )
    assert page.locator(".graft-fig .js-plotly-plot").count() == n_figs  # every figure was drawn by plotly.js
    # The swap scored two test questions, so the report holds their generations side by side (T, T', D).
    assert page.locator("table.graft-gen tbody tr").count() >= 2
    assert page.get_by_text("recorded no generations").count() == 0
    assert attempted == [] and [u for u in requests if not u.startswith(("data:", "blob:"))] == [REPORT_URL]
    assert errors == []

    page.emulate_media(media="print")
    pdf = tmp_path / "report.pdf"
    page.pdf(path=str(pdf), prefer_css_page_size=True, print_background=True)
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF")
    n_pages = len(re.findall(rb"/Type\s*/Page[^s]", data))
    assert n_pages >= 2, n_pages
    keep = os.environ.get("GRAFT_REPORT_PDF")  # set it to keep the PDF for a look at its pages
    if keep:
        Path(keep).write_bytes(data)
    assert attempted == []
