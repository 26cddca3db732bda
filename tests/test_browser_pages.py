"""Real-browser tests of every page: the app served by `streamlit run`, driven by Playwright in
Debian chromium.

One server (with its own temporary GRAFT_HOME) and one browser serve the whole module; each test
opens a fresh page, so a fresh Streamlit session. The tests run in file order and the last ones
read the run history the earlier ones wrote: Runs opens every run they made, and the navigation
test visits Compare and Verdict with their transplants in the history."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from docs.screenshots import CHROMIUM, CHROMIUM_ARGS, streamlit_server

pytestmark = [pytest.mark.browser]

TINY = "donor=tiny-gpt2-a&target=tiny-gpt2-b"
LLAMA = "donor=tiny-llama-b&target=tiny-llama-a"  # the Concept page's pair, as in tests/test_app_concept.py
RUN_MS = 120_000  # one tool run on the tiny models
PAGE_MS = 60_000  # a page's first paint
STEP_MS = 30_000  # a rerun after a click
# Plotly's drawn traces inside a chart's SVG: bars, heatmap cells, lines / markers, a table.
BARS, HEATMAP, LINES, TABLE = ".barlayer .point", ".heatmaplayer g.hm", ".scatterlayer .trace", ".table"

# The runs the tests before Runs make: (tool, run id, drawn layer of its figure), in order.
MADE: list[tuple[str, str, str]] = []
MADE_TOOLS = {  # what the tests before Runs run, each once
    "compat",
    "cartography",
    "spectrum",
    "conjugate",
    "organ-extract",
    "organ-insert",
    "position-sweep",
    "bridge-deviation",
    "go-no-go",
    "swap",
    "interference",
    "attribution",
}


@pytest.fixture(scope="module")
def server_home(tmp_path_factory) -> Path:
    """The server's GRAFT_HOME: its run history, organs and uploads."""
    return tmp_path_factory.mktemp("browser_pages") / "graft"


@pytest.fixture(scope="module")
def app_url(server_home):
    """`streamlit run app.py` on a free port, once for the module; always stopped."""
    # Never skipped silently: a missing chromium fails with the command that fixes it
    # (`make test` installs it; `-m "not browser"` deselects these tests on purpose).
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no chromium at {CHROMIUM}: run `apt-get install chromium` (make test does it as root), "
            "or deselect the browser tests with -m 'not browser'",
            pytrace=False,
        )
    env = {**os.environ, "GRAFT_HOME": str(server_home)}
    with streamlit_server(env, server_home.parent / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser(app_url):
    """One chromium (Debian's binary, never a downloaded one) for the module; always closed."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A fresh page (its own Streamlit session) 1400 px wide; always closed."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        yield context.new_page()
    finally:
        context.close()


# --------------------------------------------------------------------------- helpers
def heading(page, title: str):
    return page.get_by_role("heading", name=title, exact=True, level=1)


def open_page(page, app_url: str, path: str, title: str, query: str = TINY) -> None:
    from playwright.sync_api import expect

    page.goto(f"{app_url}/{path}?{query}", timeout=PAGE_MS)
    expect(heading(page, title)).to_be_visible(timeout=PAGE_MS)


def go_to(page, link: str, title: str) -> None:
    """Through the sidebar's navigation, as a user does."""
    from playwright.sync_api import expect

    page.locator(".st-key-graft-nav").get_by_text(link, exact=True).click()
    expect(heading(page, title)).to_be_visible(timeout=PAGE_MS)


def settled(page) -> None:
    """Wait for the script run to end (Streamlit marks it on the app's root element)."""
    from playwright.sync_api import expect

    app = page.get_by_test_id("stApp")
    expect(app).to_have_attribute("data-test-script-state", "notRunning", timeout=PAGE_MS)


def chart(page, key: str):
    """The plotly chart whose widget key starts with ``key`` (a tool's result: ``fig-<tool>-<run id>``,
    ui.jobs.result_view)."""
    return page.locator(f'[class*="st-key-{key}"] .js-plotly-plot').first


def expect_drawn(page, key: str, layer: str, title: str, timeout: float = STEP_MS) -> None:
    """The chart's SVG is drawn, with ``layer``'s traces in it and ``title`` in its title."""
    from playwright.sync_api import expect

    fig = chart(page, key)
    expect(fig.locator(".main-svg").first).to_be_attached(timeout=timeout)
    expect(fig.locator(layer).first).to_be_attached()
    expect(fig.locator(".gtitle").first).to_contain_text(title)


def run_tool(page, button: str, tool: str, layer: str, title: str) -> str:
    """Click a tool's Run button and wait for its figure drawn; returns the run's id (its job id,
    in the chart's key)."""
    settled(page)  # the click goes to the page as drawn, not into a rerun still drawing it
    page.get_by_role("button", name=button, exact=True).click()
    expect_drawn(page, f"fig-{tool}-", layer, title, timeout=RUN_MS)
    classes = page.locator(f'[class*="st-key-fig-{tool}-"]').first.get_attribute("class")
    run_id = re.search(rf"\bst-key-fig-{re.escape(tool)}-(\w+)", classes).group(1)
    MADE.append((tool, run_id, layer))
    return run_id


def set_param(page, tool: str, name: str, value: str) -> None:
    """Type a tool parameter into its widget, in the tool's "Parameters" expander (closed on a
    fresh page: opened first)."""
    from playwright.sync_api import expect

    box = page.locator(f".st-key-param-{tool}-{name}")
    box.locator("xpath=ancestor::details[1]/summary").click()
    field = box.locator("input").first
    expect(field).to_be_visible(timeout=STEP_MS)
    field.fill(value)
    field.press("Enter")
    expect(field).to_have_value(value)


def roll_back(page) -> None:
    """Click T′'s Roll back (ui.transplant.transplant_actions): the restore is checked bit-exact."""
    from playwright.sync_api import expect

    settled(page)
    page.get_by_role("button", name="Roll back", exact=True).click()
    done = page.get_by_test_id("stAlertContentSuccess").filter(
        has_text="the working copy equals the target, bit-exact ✓"
    )
    expect(done).to_be_visible(timeout=STEP_MS)
    expect(page.get_by_role("button", name="Re-apply", exact=True)).to_be_visible()


def choose(page, box: str, option: str) -> None:
    """Pick ``option`` in the selectbox labelled ``box`` (typed into its search, then clicked)."""
    from playwright.sync_api import expect

    combo = page.get_by_role("combobox", name=box)
    combo.click()
    combo.fill(option)
    page.get_by_role("option", name=option, exact=True).click()
    expect(combo).to_have_value(option, timeout=STEP_MS)


def no_exception(page) -> None:
    """Once the page's script run has ended: no traceback anywhere on it."""
    settled(page)
    errors = page.locator('[data-testid="stException"]')
    assert errors.count() == 0, errors.first.inner_text()


# --------------------------------------------------------------------------- the pages
def test_models_t1_draws_the_compatibility_table(app_url, page):
    from playwright.sync_api import expect

    open_page(page, app_url, "models", "Models")
    run_tool(page, "Run T1", "compat", TABLE, "T1 Compatibility report — donor tiny-gpt2-a vs target")
    expect(page.get_by_text("Verdicts", exact=True)).to_be_visible()
    no_exception(page)


def test_concept_t5_t6_then_conjugation_and_its_roll_back(app_url, page, tiny_adapter):
    """T5 and T6 on a PEFT adapter folder of tiny-llama-a, then the rank-k conjugation kept applied
    (max_retained_increase -1: never rolled back automatically) and rolled back in one click."""
    from playwright.sync_api import expect

    open_page(page, app_url, "concept", "Concept", LLAMA)
    expect(page.get_by_role("radio", name="A PEFT adapter folder")).to_be_checked()
    path = page.locator(".st-key-concept_adapter_path input")
    path.fill(tiny_adapter["path"])
    path.press("Enter")
    expect(page.get_by_text(f"Adapter: {tiny_adapter['path']}")).to_be_visible(timeout=STEP_MS)
    base = page.locator(".st-key-concept_base input")
    base.fill("tiny-llama-a")
    base.press("Enter")
    expect(page.get_by_role("button", name="Run T5", exact=True)).to_be_enabled(timeout=STEP_MS)

    run_tool(page, "Run T5", "cartography", HEATMAP, "T5 ")
    expect(page.get_by_test_id("stMetric").filter(has_text="Share of ‖dW‖²")).to_be_visible()
    run_tool(page, "Run T6", "spectrum", LINES, "T6 ")
    expect_drawn(page, "cell-spectrum-", LINES, "T6 ")  # the chosen cell's curve, above T6's panel

    set_param(page, "conjugate", "max_retained_increase", "-1")
    run_tool(page, "Run conjugation", "conjugate", BARS, "OP3 Rank-k conjugation")
    alerts = page.get_by_test_id("stAlert")
    expect(alerts.filter(has_text="Kept: retained perplexity")).to_be_visible()
    assert alerts.filter(has_text="Rolled back automatically").count() == 0
    roll_back(page)
    no_exception(page)


def test_organs_extract_insert_roll_back_t9_and_t10(app_url, page):
    """Extract an organ from tiny-gpt2-a (OP2.1), insert it into tiny-gpt2-b (OP2.3) and roll it
    back bit-exact, then T9 (every position) and T10 (bridge deviation) with that organ."""
    from playwright.sync_api import expect

    open_page(page, app_url, "organs", "Organs")
    insert = page.get_by_role("button", name="Insert organ", exact=True)
    expect(insert).to_be_disabled()  # no organ yet
    run_tool(page, "Extract organ", "organ-extract", BARS, "OP2.1 ")
    expect(page.get_by_text("tiny-gpt2-a blocks 1–3 (k=3")).to_be_visible(timeout=STEP_MS)  # picked
    expect(insert).to_be_enabled(timeout=STEP_MS)

    run_tool(page, "Insert organ", "organ-insert", BARS, "OP2.3 ")
    roll_back(page)
    run_tool(page, "Run T9", "position-sweep", LINES, "T9 Position sensitivity")
    run_tool(page, "Run T10", "bridge-deviation", BARS, "T10 Bridge deviation")
    no_exception(page)


def test_go_no_go_shows_the_recommendation_and_its_figure(app_url, page, server_home):
    """OP0 on the tiny pair: the recommendation line is the one the run recorded, one no-go card per
    operation, and the figure is drawn."""
    from playwright.sync_api import expect

    from engine.running.history import History

    open_page(page, app_url, "gonogo", "Go / no-go")
    run_id = run_tool(page, "Run go / no-go", "go-no-go", TABLE, "OP0 Go / no-go")
    line = History(server_home / "history.sqlite").get(run_id)["result"]["result"]["recommendation"]
    # Two unrelated random models: nothing is viable, and the line (an error) says why for each.
    assert line.startswith("no-go: no operation is viable for this pair. Module swap: T3: "), line
    expect(page.get_by_test_id("stAlertContentError").filter(has_text=line)).to_be_visible()
    for title in ("Module swap", "Organ transplant", "Rank-k conjugation"):
        card = page.get_by_test_id("stMarkdownContainer").filter(has_text=re.compile(rf"^{title} no-go$"))
        expect(card).to_be_visible()
    no_exception(page)


def test_verdict_t12_t13_on_a_swap_made_in_the_same_session(app_url, page):
    """T11 on the Transplant page, then Verdict: that swap is the run it checks (the newest
    transplant run); T12 draws its histogram and stability checks, T13 (steps 4) its attribution."""
    from playwright.sync_api import expect

    open_page(page, app_url, "transplant", "Transplant")
    swap_id = run_tool(page, "Run T11", "swap", BARS, "T11 ")
    go_to(page, "Verdict", "Verdict")
    picked = page.get_by_role("combobox", name="Transplant run")
    expect(picked).to_have_value(re.compile(rf"^swap · tiny-gpt2-a → tiny-gpt2-b · .* · {swap_id}$"))

    run_tool(page, "Run T12", "interference", BARS, "T12 ")
    checks = page.get_by_test_id("stAlertContentSuccess")
    for check in ("Applied twice", "Saved and reloaded"):
        expect(checks.filter(has_text=check)).to_be_visible()
    expect(page.get_by_text("Worst hit").first).to_be_visible()

    set_param(page, "attribution", "steps", "4")
    run_tool(page, "Run T13", "attribution", HEATMAP, "T13 ")
    expect(page.get_by_text("convergence delta").first).to_be_visible()
    no_exception(page)


def test_runs_lists_every_run_made_and_opens_each_figure(app_url, page, tiny_adapter):
    """Runs: every run the tests above made is in the history's list, and opening it (filtered by
    its tool) draws its figure again from the history."""
    from playwright.sync_api import expect

    from engine.api import get_tool

    assert {tool for tool, _, _ in MADE} == MADE_TOOLS, "Runs reads the runs of the tests above it"
    open_page(page, app_url, "runs", "Runs")
    for tool, run_id, layer in MADE:
        t = get_tool(tool)
        choose(page, "Filter by tool", f"{t.code} {t.title}")
        expect(page.get_by_role("combobox", name="Open a run")).to_have_value(
            re.compile(rf"^{re.escape(f'{t.code} {t.title}')} · .* · done · ")
        )
        expect_drawn(page, f"fig-{tool}-run-{run_id}", layer, f"{t.code} ")

    # Roll backs are runs too, named as their transplant's run is: the adapter for the conjugation's,
    # "—" for an organ's donor (never "None", pages/runs.py and ui/transplant.py).
    choose(page, "Filter by tool", "rollback")
    opened = page.get_by_role("combobox", name="Open a run")
    expect(opened).to_have_value(re.compile("^Roll back transplant · "))  # the filter's rerun is drawn
    opened.click()
    # Newest first: the organ's (the Organs test), then the conjugation's (the Concept test).
    rows = [
        re.compile("^Roll back transplant · — → tiny-gpt2-b · done · "),
        re.compile(rf"^Roll back transplant · {re.escape(tiny_adapter['path'])} → tiny-llama-a · done · "),
    ]
    expect(page.get_by_role("option")).to_have_text(rows)
    page.keyboard.press("Escape")
    caption = page.get_by_test_id("stCaptionContainer").filter(has_text="created").first
    expect(caption).to_contain_text("donor — → target tiny-gpt2-b · created")
    no_exception(page)


PAGES = [  # the sidebar's link, the page's h1 (pages/*.py st.title; Start here: ui.boot.TITLE)
    ("Models", "Models"),
    ("Alignment", "Alignment"),
    ("Go / no-go", "Go / no-go"),
    ("Concept", "Concept"),
    ("Transplant", "Transplant"),
    ("Organs", "Organs"),
    ("Compare", "Compare"),
    ("Verdict", "Verdict"),
    ("Runs", "Runs"),
    ("Start here", "Graft"),
]


def test_the_navigation_visits_every_page(app_url, page):
    """All ten pages through the sidebar's navigation, each with its heading and no exception (with
    the runs above in the history: Compare shows the newest transplant, Runs the newest run)."""
    from playwright.sync_api import expect

    from ui.boot import TITLE

    assert PAGES[-1][1] == TITLE
    open_page(page, app_url, "", TITLE)
    nav = page.locator(".st-key-graft-nav")
    expect(nav.get_by_role("link")).to_have_count(len(PAGES))
    for link, title in PAGES:
        go_to(page, link, title)
        assert "donor=tiny-gpt2-a" in page.url and "target=tiny-gpt2-b" in page.url
        no_exception(page)
