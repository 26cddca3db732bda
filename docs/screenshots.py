"""Full-page screenshots of the app for the docs: one PNG per page in docs/.

Starts ``streamlit run app.py`` on a free port, drives it with Playwright in Debian chromium,
runs T1 on Models, T2/T3/T4 on Alignment, the go / no-go, T5/T6 and the conjugation on Concept,
T7/T11/T8 on Transplant, opens the swap on Compare, checks it with T12/T13 on Verdict, extracts an
organ and inserts it (with T9 at three positions) on Organs, then shows Runs.

    python docs/screenshots.py                      # demo pair once built, else the tiny pair
    python docs/screenshots.py --donor tiny-llama-a --target tiny-gpt2-b --home /tmp/graft

``--home`` sets GRAFT_HOME for the server (default: your real Graft cache, so built-in models show
as they are on this machine).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
WIDTH = 1440


def default_pair() -> tuple[str, str]:
    sys.path.insert(0, str(ROOT))
    from engine.loading.builtins import DEMO_DONOR, SMOLLM2, builtin_status

    status = builtin_status()
    if status[DEMO_DONOR]["state"] == "ready" and status[SMOLLM2]["state"] == "ready":
        return DEMO_DONOR, SMOLLM2
    return "tiny-gpt2-a", "tiny-gpt2-b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def streamlit_server(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """Serve app.py on a free port; the server's process group is always stopped at the end."""
    port = free_port()
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.port",
            str(port),
            "--server.headless",
            "true",
            "--server.fileWatcherType",
            "none",
            "--browser.gatherUsageStats",
            "false",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited; see {log_path}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"streamlit did not start in 90 s; see {log_path}")
            time.sleep(0.3)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def full_page_png(page, path: Path) -> None:
    """Streamlit scrolls inside its main container, so grow the viewport to the content first."""
    page.mouse.move(2, 2)  # no hover tooltip in the picture
    height = page.evaluate(
        "() => Math.max(document.body.scrollHeight, ...[...document.querySelectorAll("
        "'[data-testid=stMain], [data-testid=stAppViewContainer], [data-testid=stSidebarContent]')]"
        ".map(e => e.scrollHeight))"
    )
    page.set_viewport_size({"width": WIDTH, "height": int(height) + 40})
    page.wait_for_timeout(1500)  # plotly relayouts to the new size
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": WIDTH, "height": 1000})
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def run_and_wait(page, button: str, n_plots: int, timeout_s: float) -> None:
    page.get_by_role("button", name=button).click()
    try:
        page.wait_for_function(
            "n => document.querySelectorAll('.js-plotly-plot').length >= n && "
            "!document.querySelector('[data-testid=stProgress]')",
            arg=n_plots,
            timeout=timeout_s * 1000,
        )
    except Exception:
        shot = Path(tempfile.gettempdir()) / f"graft-screenshots-failed-{button.replace(' ', '-')}.png"
        full_page_png(page, shot)
        raise RuntimeError(
            f"'{button}' did not give {n_plots} figure(s) in {timeout_s:g} s; the page is in {shot}"
        ) from None


def set_param(page, tool: str, name: str, value: str) -> None:
    """Type a tool parameter into its widget (opening the tool's Parameters expander first)."""
    box = page.locator(f".st-key-param-{tool}-{name}")
    field = box.locator("input").first
    if not field.is_visible():
        box.locator("xpath=ancestor::details[1]/summary").click()
    field.fill(value)
    field.press("Enter")
    page.wait_for_timeout(800)


def goto_page(page, title: str) -> None:
    page.locator(".st-key-graft-nav").get_by_text(title, exact=True).click()
    page.get_by_role("heading", name=title, exact=True, level=1).wait_for(timeout=60_000)
    page.wait_for_timeout(500)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--donor", help="donor model (default: the demo donor once built, else tiny-gpt2-a)")
    ap.add_argument(
        "--target", help="target model (default: SmolLM2 once the demo donor is built, else tiny-gpt2-b)"
    )
    ap.add_argument("--home", help="GRAFT_HOME for the server (default: your real Graft cache)")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder for the PNGs")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for each tool run")
    ap.add_argument("--only-home", action="store_true", help="only the Start here page (home.png)")
    ap.add_argument(
        "--pages",
        default="home,models,alignment,gonogo,concept,transplant,compare,verdict,organs,runs",
        help="comma-separated pages to shoot, in this order (default: all)",
    )
    ap.add_argument(
        "--swap-k",
        type=int,
        default=0,
        help="K for the T11 swap (default: 128 for the demo pair, where the K sweep shows knowledge moving; "
        "else the tool's default)",
    )
    ap.add_argument(
        "--t13-max-steps",
        type=int,
        default=32,
        help="T13's max_steps for the Verdict shot (the tool's default, 128, takes about 10 minutes on "
        "SmolLM2 on 2 CPU cores; layers that do not converge are flagged in the figure)",
    )
    ap.add_argument("--t9-positions", default="0,10,20", help="T9's positions for the Organs shot")
    args = ap.parse_args()

    env = dict(os.environ)
    if args.home:
        env["GRAFT_HOME"] = args.home
        os.environ["GRAFT_HOME"] = args.home
    donor, target = default_pair()
    donor, target = args.donor or donor, args.target or target
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    query = urllib.parse.urlencode({"donor": donor, "target": target})

    from playwright.sync_api import sync_playwright

    log = Path(tempfile.gettempdir()) / f"graft-screenshots-{os.getpid()}.log"
    with streamlit_server(env, log) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 1000}, device_scale_factor=1)
            page.goto(f"{url}/?{query}", timeout=120_000)
            page.get_by_role("heading", name="Graft", exact=True, level=1).wait_for(timeout=120_000)
            page.get_by_test_id("stMetric").first.wait_for(timeout=120_000)
            pages = {p.strip() for p in args.pages.split(",") if p.strip()}
            if "home" in pages:
                full_page_png(page, out / "home.png")
            if args.only_home:
                return
            if "models" in pages:
                page.goto(f"{url}/models?{query}", timeout=120_000)
                page.get_by_role("heading", name="Models", exact=True, level=1).wait_for(timeout=120_000)
                run_and_wait(page, "Run T1", 1, args.timeout)
                full_page_png(page, out / "models.png")

            if "alignment" in pages:
                goto_page(page, "Alignment")
                for n, code in enumerate(("T2", "T3", "T4"), start=1):
                    run_and_wait(page, f"Run {code}", n, args.timeout)
                full_page_png(page, out / "alignment.png")

            if "gonogo" in pages:
                goto_page(page, "Go / no-go")
                run_and_wait(page, "Run go / no-go", 1, args.timeout)
                full_page_png(page, out / "gonogo.png")

            if "concept" in pages:
                goto_page(page, "Concept")
                run_and_wait(page, "Run T5", 1, args.timeout)
                run_and_wait(page, "Run T6", 3, args.timeout)  # T5, the chosen cell's spectrum, T6
                page.get_by_role("button", name="Run conjugation").click()
                page.get_by_text("Per module: the map of each side").wait_for(timeout=args.timeout * 1000)
                full_page_png(page, out / "concept.png")

            if "transplant" in pages:
                goto_page(page, "Transplant")
                swap_k = args.swap_k or (
                    128 if (donor, target) == default_pair() and "+concept" in donor else 0
                )
                for n, code in enumerate(("T7", "T11", "T8"), start=1):
                    if code == "T11" and swap_k:
                        page.get_by_text("Parameters", exact=True).nth(1).click()  # T11's parameters
                        k_input = page.get_by_label("K", exact=True)
                        k_input.fill(str(swap_k))
                        k_input.press("Enter")
                        page.wait_for_timeout(1000)
                    run_and_wait(page, f"Run {code}", n, args.timeout)
                full_page_png(page, out / "transplant.png")

            if "compare" in pages:
                goto_page(page, "Compare")
                page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
                page.locator("table.graft-gen").first.wait_for(timeout=60_000)
                full_page_png(page, out / "compare.png")

            if "verdict" in pages:  # the swap made on Transplant, rebuilt from the run history
                goto_page(page, "Verdict")
                run_and_wait(page, "Run T12", 1, args.timeout)
                set_param(page, "attribution", "max_steps", str(args.t13_max_steps))
                run_and_wait(page, "Run T13", 2, args.timeout)
                full_page_png(page, out / "verdict.png")

            if "organs" in pages:
                goto_page(page, "Organs")
                run_and_wait(page, "Extract organ", 1, args.timeout)  # the organ picker then picks it
                page.wait_for_timeout(1500)
                run_and_wait(page, "Insert organ", 2, args.timeout)
                set_param(page, "position-sweep", "positions", args.t9_positions)
                run_and_wait(page, "Run T9", 3, args.timeout)
                full_page_png(page, out / "organs.png")

            if "runs" in pages:
                goto_page(page, "Runs")
                page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
                full_page_png(page, out / "runs.png")
        finally:
            browser.close()
    log.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
