"""Real-browser tests: the app served by `streamlit run`, driven by Playwright in Debian chromium."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from docs.screenshots import CHROMIUM, CHROMIUM_ARGS, streamlit_server

pytestmark = [pytest.mark.browser]


@pytest.fixture
def app_url(tmp_path):
    # Never skipped silently: a missing chromium fails with the command that fixes it
    # (`make test` installs it; `-m "not browser"` deselects these tests on purpose).
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no chromium at {CHROMIUM}: run `apt-get install chromium` (make test does it as root), "
            "or deselect the browser tests with -m 'not browser'",
            pytrace=False,
        )
    """`streamlit run app.py` on a free port with a temporary GRAFT_HOME; always stopped."""
    env = {**os.environ, "GRAFT_HOME": str(tmp_path / "graft")}
    with streamlit_server(env, tmp_path / "streamlit.log") as url:
        yield url


@pytest.fixture
def page(app_url):
    """A chromium page (Debian's binary, never a downloaded one) 1400 px wide; always closed."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


def test_cka_heatmap_renders_in_a_real_browser(app_url, page):
    from playwright.sync_api import expect

    page.goto(f"{app_url}/?donor=tiny-gpt2-a&target=tiny-gpt2-b", timeout=60_000)
    expect(page.get_by_test_id("stMetric").filter(has_text="tiny-gpt2-a")).to_be_visible(timeout=60_000)
    expect(page.get_by_test_id("stMetric").filter(has_text="tiny-gpt2-b")).to_be_visible()
    expect(page.get_by_role("heading", name="Start here")).to_be_visible()

    page.locator(".st-key-graft-nav").get_by_text("Alignment").click()
    expect(page.get_by_role("heading", name="Alignment", exact=True, level=1)).to_be_visible(timeout=30_000)
    assert "donor=tiny-gpt2-a" in page.url and "target=tiny-gpt2-b" in page.url

    page.get_by_role("button", name="Run T2").click()
    heatmap = page.locator(".js-plotly-plot .heatmaplayer g.hm").first
    expect(heatmap).to_be_attached(timeout=90_000)
    expect(page.locator('[data-testid="stMetric"]').filter(has_text="Mean matched CKA")).to_be_visible()
    assert page.locator('[data-testid="stException"]').count() == 0


def test_swap_then_compare_in_a_real_browser(app_url, page):
    """Transplant page: run T11 on the tiny pair; Compare shows T, T' and D, then roll back."""
    from playwright.sync_api import expect

    page.goto(f"{app_url}/transplant?donor=tiny-gpt2-a&target=tiny-gpt2-b", timeout=60_000)
    expect(page.get_by_role("heading", name="Transplant", exact=True, level=1)).to_be_visible(timeout=60_000)
    page.get_by_role("button", name="Run T11").click()
    expect(page.locator(".js-plotly-plot").first).to_be_attached(timeout=120_000)
    expect(page.get_by_role("button", name="Roll back")).to_be_visible(timeout=30_000)

    page.locator(".st-key-graft-nav").get_by_text("Compare", exact=True).click()
    expect(page.get_by_role("heading", name="Compare", exact=True, level=1)).to_be_visible(timeout=30_000)
    table = page.locator("table.graft-gen")
    expect(table).to_be_visible(timeout=30_000)
    for col in ("T (target)", "T′ (transplanted)", "D (donor)"):
        expect(table.locator("th", has_text=col)).to_be_visible()
    expect(page.locator(".js-plotly-plot .barlayer").first).to_be_attached()
    expect(page.get_by_test_id("stMetric").filter(has_text="Recovery (graded)")).to_be_visible()
    page.get_by_role("button", name="Roll back").click()
    expect(page.get_by_text("bit-exact ✓")).to_be_visible(timeout=30_000)
    assert page.locator('[data-testid="stException"]').count() == 0


def test_cold_first_load_never_shows_streamlits_own_page_list(app_url, page):
    """A fresh server's first script run is served the legacy pages/ way: Streamlit's own page
    list must never appear, the app's navigation must, and a deep link lands on its page."""
    import time

    from playwright.sync_api import expect

    page.goto(f"{app_url}/alignment?donor=tiny-gpt2-a&target=tiny-gpt2-b", timeout=60_000)
    heading = page.get_by_role("heading", name="Alignment", exact=True, level=1)
    seen_legacy = 0
    t0 = time.time()
    while time.time() - t0 < 90 and not heading.is_visible():
        seen_legacy += page.locator('[data-testid="stSidebarNav"]').count()
        time.sleep(0.05)
    expect(heading).to_be_visible()
    assert seen_legacy == 0, "Streamlit's own page list was shown"
    nav = page.locator(".st-key-graft-nav")
    for title in ("Start here", "Models", "Alignment", "Transplant", "Compare", "Runs"):
        expect(nav.get_by_text(title, exact=True)).to_be_visible()
    assert page.locator('[data-testid="stSidebarNav"]').count() == 0


def test_the_run_is_for_the_pair_on_the_screen(app_url, page):
    """Swap the pair and click Run at once: the figure is for the pair shown; after another
    swap the old figure is flagged instead of passing for the new pair's."""
    from playwright.sync_api import expect

    page.goto(f"{app_url}/alignment?donor=tiny-gpt2-a&target=tiny-gpt2-b", timeout=60_000)
    expect(page.get_by_role("heading", name="Alignment", exact=True, level=1)).to_be_visible(timeout=60_000)
    page.get_by_role("button", name="Swap donor and target").click()
    page.get_by_role("button", name="Run T2").click()
    expect(page.locator(".js-plotly-plot .heatmaplayer g.hm").first).to_be_attached(timeout=90_000)
    expect(page.get_by_text("donor tiny-gpt2-b → target tiny-gpt2-a").first).to_be_visible()
    assert "donor=tiny-gpt2-b" in page.url and "target=tiny-gpt2-a" in page.url

    page.get_by_role("button", name="Swap donor and target").click()
    expect(page.get_by_text("This result is for tiny-gpt2-b → tiny-gpt2-a").first).to_be_visible(
        timeout=30_000
    )
    expect(page.locator(".js-plotly-plot").first).to_be_hidden()


def test_a_crafted_link_renders_no_markup_and_fetches_nothing(app_url, page):
    """?donor= from a link: the browser shows the text as written; no remote image is requested and
    no link, styled text or LaTeX is drawn from it (markdown escaped by ui.text.md)."""
    from urllib.parse import quote, urlparse

    from playwright.sync_api import expect

    evil = "![x](http://127.0.0.1:9/track.png) [click](https://example.invalid/p) **bold** :red[red] $x^2$"
    outside = []
    page.on(
        "request",
        lambda r: (
            outside.append(r.url) if urlparse(r.url).netloc in ("127.0.0.1:9", "example.invalid") else None
        ),
    )
    page.goto(f"{app_url}/?donor={quote(evil)}&target=tiny-gpt2-b", timeout=60_000)
    shown = page.get_by_test_id("stAlert").filter(has_text="track.png").first
    expect(shown).to_be_visible(timeout=60_000)
    assert evil in shown.inner_text()  # every character as typed
    page.wait_for_timeout(1000)
    assert outside == []
    assert page.locator('img[src*="track.png"]').count() == 0
    assert page.locator('a[href*="example.invalid"]').count() == 0
    assert page.locator(".katex").count() == 0
    assert page.locator('[data-testid="stException"]').count() == 0


def test_a_json_workload_uploads_and_runs_in_a_real_browser(app_url, page, tmp_path):
    """The sidebar's upload takes a .json array of texts, counts its texts, and T2 runs on it."""
    import json

    from playwright.sync_api import expect

    f = tmp_path / "prompts.json"
    f.write_text(
        json.dumps(
            [
                "Paris is the capital of France.",
                {"text": "Water boils at one hundred degrees."},
                "The quick brown fox jumps over the lazy dog.",
            ]
        ),
        encoding="utf-8",
    )
    page.goto(f"{app_url}/alignment?donor=tiny-gpt2-a&target=tiny-gpt2-b", timeout=60_000)
    expect(page.get_by_role("heading", name="Alignment", exact=True, level=1)).to_be_visible(timeout=60_000)
    page.get_by_text("Run options").click()
    page.get_by_text("Upload a file").click()
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(f))
    expect(page.get_by_text("prompts · 3 texts")).to_be_visible(timeout=30_000)
    page.get_by_role("button", name="Run T2").click()
    expect(page.locator(".js-plotly-plot .heatmaplayer g.hm").first).to_be_attached(timeout=90_000)
    assert page.locator('[data-testid="stException"]').count() == 0
