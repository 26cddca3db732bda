"""How fast the app feels: first paint of a fresh server, first visit of every page, later switches.

Serves ``app.py`` with ``streamlit run`` (a new server process each round, so every round is a
cold first load with the models cached on disk) and drives Debian's chromium through Playwright,
as the browser tests do. Per round it measures, from ``page.goto``:

* ``first_paint``: the Start page's heading ("Graft", an ``h1``) is visible;
* ``sidebar``: the donor picker is visible (the sidebar is usable);
* ``badge``: the sidebar's T1 compatibility badge shows its verdicts (both models loaded);

then clicks through the navigation, timing each page until its ``h1`` is visible: the first visit
of every page, then a second pass (later switches); last, a second visitor (a new session on the
now-warm server) is timed to the heading and to the badge. The server's own start (process launch to
``/_stcore/health``) is reported apart. Usage:

    python bench/firstpaint.py [--rounds 3] [--donor D --target T] [--json out.json]

The default pair is the sidebar's default (the demo pair once built). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docs.screenshots import CHROMIUM, CHROMIUM_ARGS, streamlit_server  # noqa: E402

PAGES = (
    "Models",
    "Alignment",
    "Go / no-go",
    "Concept",
    "Transplant",
    "Organs",
    "Compare",
    "Verdict",
    "Runs",
    "Start here",
)
HEADINGS = {"Start here": "Graft"}  # nav label -> the page's h1 where they differ


def one_round(query: str) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with streamlit_server(dict(os.environ), Path(tmp) / "streamlit.log") as url:
            out["server_start_s"] = time.perf_counter() - t0
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                try:
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    t0 = time.perf_counter()
                    page.goto(f"{url}/{query}", timeout=120_000)
                    page.get_by_role("heading", name="Graft", exact=True, level=1).first.wait_for(
                        timeout=120_000
                    )
                    out["first_paint_s"] = time.perf_counter() - t0
                    page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').first.wait_for(
                        timeout=120_000
                    )
                    out["sidebar_s"] = time.perf_counter() - t0
                    page.get_by_text("Compatibility (T1)").first.wait_for(timeout=120_000)
                    page.locator('[data-testid="stSidebar"]').get_by_text("module swap").first.wait_for(
                        timeout=180_000
                    )
                    out["badge_s"] = time.perf_counter() - t0
                    nav = page.locator(".st-key-graft-nav")
                    for label in ("first_visit", "later_switch"):
                        times = {}
                        for title in PAGES:
                            t1 = time.perf_counter()
                            nav.get_by_text(title, exact=True).click()
                            heading = page.get_by_role(
                                "heading", name=HEADINGS.get(title, title), exact=True, level=1
                            )
                            heading.first.wait_for(state="visible", timeout=120_000)
                            times[title] = time.perf_counter() - t1
                            _settle(page)
                        out[label] = times
                    out["exceptions"] = page.locator('[data-testid="stException"]').count()
                    # A second visitor (or a reload) on the now-warm server: a new session.
                    again = browser.new_page(viewport={"width": 1400, "height": 1000})
                    t0 = time.perf_counter()
                    again.goto(f"{url}/{query}", timeout=120_000)
                    again.get_by_role("heading", name="Graft", exact=True, level=1).first.wait_for(
                        timeout=120_000
                    )
                    out["warm_first_paint_s"] = time.perf_counter() - t0
                    again.locator('[data-testid="stSidebar"]').get_by_text("module swap").first.wait_for(
                        timeout=120_000
                    )
                    out["warm_badge_s"] = time.perf_counter() - t0
                finally:
                    browser.close()
    return out


def _settle(page: Any, quiet_s: float = 0.3, timeout_s: float = 30.0) -> None:
    """Wait until the script run is over (Streamlit's status widget gone) before the next click."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if page.locator('[data-testid="stStatusWidget"]').count() == 0:
            time.sleep(quiet_s)
            if page.locator('[data-testid="stStatusWidget"]').count() == 0:
                return
        time.sleep(0.05)


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    summary = {
        k: med(k)
        for k in (
            "server_start_s",
            "first_paint_s",
            "sidebar_s",
            "badge_s",
            "warm_first_paint_s",
            "warm_badge_s",
        )
    }
    for label in ("first_visit", "later_switch"):
        per_page = {t: statistics.median(r[label][t] for r in rounds) for t in PAGES}
        summary[label] = per_page
        summary[f"{label}_max_s"] = max(per_page.values())
    summary["exceptions"] = sum(r["exceptions"] for r in rounds)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--donor", default="")
    ap.add_argument("--target", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"no chromium at {CHROMIUM}: apt-get install chromium")
    query = f"?donor={args.donor}&target={args.target}" if args.donor and args.target else ""
    rounds = []
    for i in range(args.rounds):
        r = one_round(query)
        rounds.append(r)
        print(
            f"round {i + 1}: server {r['server_start_s']:.2f} s · first paint {r['first_paint_s']:.2f} s · "
            f"sidebar {r['sidebar_s']:.2f} s · T1 badge {r['badge_s']:.2f} s · "
            f"slowest first visit {max(r['first_visit'].values()):.2f} s · "
            f"slowest later switch {max(r['later_switch'].values()):.2f} s",
            flush=True,
        )
    s = summarise(rounds)
    print(f"\nmedian of {len(rounds)} rounds (pair: {args.donor or 'default'} -> {args.target or 'default'})")
    print(f"  server start (process -> health)   {s['server_start_s']:.2f} s")
    print(f"  first paint (Start page heading)   {s['first_paint_s']:.2f} s")
    print(f"  sidebar usable (donor picker)      {s['sidebar_s']:.2f} s")
    print(f"  T1 badge (both models loaded)      {s['badge_s']:.2f} s")
    print(
        f"  a second visit, warm server: heading {s['warm_first_paint_s']:.2f} s, T1 badge "
        f"{s['warm_badge_s']:.2f} s"
    )
    print(f"  {'page':<12} {'first visit':>12} {'later switch':>13}")
    for t in PAGES:
        print(f"  {t:<12} {s['first_visit'][t]:>10.2f} s {s['later_switch'][t]:>11.2f} s")
    print(
        f"  slowest: first visit {s['first_visit_max_s']:.2f} s, later switch "
        f"{s['later_switch_max_s']:.2f} s; "
        f"exception boxes seen: {s['exceptions']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "median": s}, indent=2))


if __name__ == "__main__":
    main()
