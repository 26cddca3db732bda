"""Transplant and Compare pages, driven headless with AppTest on the tiny same-family pair.

A module swap launched from the Transplant page runs as a background job; the Compare page then
shows T, T' and D (cards, bars, answers side by side); roll back and save are one click each and
land in the run history.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_app import TINY, has_chart, open_app, run_until, texts


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFT_HOME", str(tmp_path / "graft"))
    return tmp_path / "graft"


def test_compare_without_a_swap_says_where_to_start(home):
    at = open_app("pages/compare.py")
    assert "No transplant yet" in texts(at.info)


def test_swap_then_compare_rollback_and_save(home, tmp_path):
    at = open_app("pages/transplant.py")
    assert [b.key for b in at.button if b.key and b.key.startswith("run-")] == [
        "run-rank-modules",
        "run-swap",
        "run-sweep-k",
    ]
    # K = 4 through the tool's own parameter widget
    at.number_input(key="param-swap-k").set_value(4).run()
    at.button(key="run-swap").click().run()
    run_until(at, has_chart, timeout=120)
    assert not at.exception and not at.error, texts(at.error)
    assert "Transplant T′" in texts(at.markdown)
    assert any(b.key and b.key.startswith("rollback-transplant-") for b in at.button)

    at.switch_page("pages/compare.py").run()
    assert not at.exception and not at.error, texts(at.error)
    labels = [m.label for m in at.metric]
    for want in (
        "Concept perplexity (T′)",
        "Retained perplexity (T′)",
        "Graded task score (T′)",
        "Alignment score with D (T′)",
        "TIR (graded)",
        "Recovery (graded)",
    ):
        assert want in labels, labels
    assert has_chart(at)
    page_html = "\n".join(h.proto.body for h in at.html)
    for col in ("T (target)", "T′ (transplanted)", "D (donor)"):
        assert col in page_html
    assert page_html.count("<tr>") == 1 + 13  # header + the bundled set's 13 held-out questions
    # switch the score kind: cards follow
    at.segmented_control(key="compare_score").set_value("exact").run()
    labels = [m.label for m in at.metric]
    assert "Exact task score (T′)" in labels and "Recovery (exact)" in labels, labels
    assert "exact score" in texts(at.caption)
    # one-click rollback, bit-exact, recorded in the history
    rb = next(b for b in at.button if b.key and b.key.startswith("rollback-compare-"))
    rb.click().run()
    assert not at.exception
    assert "bit-exact ✓" in texts(at.success), texts(at.error)
    assert any(b.key and b.key.startswith("reapply-compare-") for b in at.button)
    # one-click save (re-applies T' first), as a background job
    folder = tmp_path / "tprime"
    key = next(t.key for t in at.text_input if t.key and t.key.startswith("save-folder-compare-"))
    at.text_input(key=key).set_value(str(folder)).run()
    next(b for b in at.button if b.key and b.key.startswith("save-compare-")).click().run()
    run_until(at, lambda a: "Saved to" in texts(a.success), timeout=60)
    card = json.loads((folder / "surgery.json").read_text())
    assert card["operation"] == "module-swap" and len(card["modules"]) == 4
    from transformers import AutoModelForCausalLM

    from engine.loading.models import ModelSpec, load_model

    donor = load_model(ModelSpec.parse(TINY[0]), "cpu")
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.tensor([donor.tokenizer("The river flows north.")["input_ids"]])
    with torch.inference_mode():
        out = reloaded(ids).logits
    assert torch.isfinite(out).all()

    at.switch_page("pages/runs.py").run()
    tools = list(at.dataframe[0].value["tool"])
    assert {"Save transplant as model", "Roll back transplant"} <= set(tools), tools
    assert any("Module swap" in t for t in tools)


def test_cross_family_swap_is_a_one_line_error(home):
    at = open_app("pages/transplant.py", donor="tiny-llama-a", target="tiny-gpt2-b")
    at.button(key="run-swap").click().run()
    run_until(at, lambda a: bool(a.error), timeout=60)
    assert not at.exception
    msg = texts(at.error)
    assert "\n" not in msg.strip() and "Traceback" not in msg
