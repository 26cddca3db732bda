"""The Organs page, driven headless with AppTest: extract an organ from the sidebar's donor, pick
it, insert it into the target (kept applied, rolled back in one click, shown on Compare), and T9."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest
from test_app import open_app, run_until  # noqa: E402  (tests/ is on sys.path under pytest)


def charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def open_organs() -> AppTest:
    return open_app("pages/organs.py", donor="tiny-gpt2-a", target="tiny-gpt2-b")


def test_extract_insert_roll_back_compare_and_t9(home):
    at = open_organs()
    assert at.button(key="run-organ-insert").disabled  # no organ yet: the panel says so
    at.button(key="run-organ-extract").click().run()
    run_until(at, lambda a: charts(a) >= 1)
    at.run()
    pick = at.selectbox(key="organ_pick")
    assert Path(pick.value).name.startswith("tiny-gpt2-a-s1-k3")
    assert "blocks 1–3" in "\n".join(str(c.value) for c in at.caption)
    at.button(key="run-organ-insert").click().run()
    run_until(at, lambda a: any(b.key and b.key.startswith("rollback-organs") for b in a.button), timeout=120)
    next(b for b in at.button if b.key.startswith("rollback-organs")).click().run()
    assert "bit-exact" in "\n".join(str(s.value) for s in at.success)
    at.button(key="run-position-sweep").click().run()
    run_until(
        at,
        lambda a: any("Position sensitivity" in ch.proto.spec for ch in a.get("plotly_chart")),
        timeout=120,
    )
    at.switch_page("pages/compare.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Organ insertion" in at.get("plotly_chart")[0].proto.spec


def test_typed_organ_folder_that_is_not_an_organ_is_one_line(home, tmp_path):
    at = open_organs()
    at.selectbox(key="organ_pick").set_value("a folder I type…").run()
    at.text_input(key="organ_path").set_value(str(tmp_path)).run()
    assert at.button(key="run-organ-insert").disabled
    assert not at.exception
