"""The Concept page, driven headless with AppTest: T5 on a PEFT adapter folder, a chosen cell's
spectrum from T6, and one-line errors for a bad adapter."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest
from test_app import open_app, run_until, shown  # noqa: E402  (tests/ is on sys.path under pytest)


def open_concept() -> AppTest:
    return open_app("pages/concept.py", donor="tiny-llama-b", target="tiny-llama-a")


def charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def test_adapter_folder_cartography_then_cell_spectrum(home, tiny_adapter):
    at = open_concept()
    # tiny-llama-b is no Graft donor: the page offers a PEFT folder or a full fine-tune.
    assert at.radio(key="concept_source").options[0] == "A PEFT adapter folder"
    at.text_input(key="concept_adapter_path").set_value(tiny_adapter["path"]).run()
    at.text_input(key="concept_base").set_value("tiny-llama-a").run()
    assert not at.error, [e.value for e in at.error]
    at.button(key="run-cartography").click().run()
    run_until(at, lambda a: charts(a) >= 1)
    assert any("Share" in m.label for m in at.metric)
    assert "Run **T6** below once" in "\n".join(str(c.value) for c in at.caption)
    at.button(key="run-spectrum").click().run()
    run_until(at, lambda a: charts(a) >= 3)  # T5 heatmap, the cell's spectrum, T6 figure
    cell = at.selectbox(key="concept_cell")
    other = cell.options[-1]
    cell.set_value(other).run()
    assert not at.exception


def test_full_finetune_source_and_bad_adapter_are_one_line(home):
    at = open_concept()
    at.radio(key="concept_source").set_value("A PEFT adapter folder").run()
    at.text_input(key="concept_adapter_path").set_value("/no/such/adapter").run()
    errors = [b for b in at.button if b.key == "run-cartography"]
    assert errors and errors[0].disabled
    at.radio(key="concept_source").set_value("Full fine-tune: donor − base").run()
    at.text_input(key="concept_base").set_value("tiny-llama-a").run()
    at.button(key="run-cartography").click().run()
    run_until(at, lambda a: charts(a) >= 1)
    assert "donor **tiny-llama-b** → base **tiny-llama-a**" in shown(
        "\n".join(str(c.value) for c in at.caption)
    )


def test_conjugation_from_the_concept_page_then_compare_and_roll_back(home, tiny_adapter):
    at = open_concept()
    at.text_input(key="concept_adapter_path").set_value(tiny_adapter["path"]).run()
    at.text_input(key="concept_base").set_value("tiny-llama-a").run()
    # Negative: never roll back automatically, so T' stays applied and the page must offer the roll back.
    at.number_input(key="param-conjugate-max_retained_increase").set_value(-1.0).run()
    at.button(key="run-conjugate").click().run()
    run_until(
        at, lambda a: any(b.key and b.key.startswith("rollback-concept") for b in a.button), timeout=120
    )
    assert not at.exception
    text = "\n".join(str(s.value) for s in list(at.success) + list(at.error))
    assert "retained perplexity" in text and "Rolled back automatically" not in text
    next(b for b in at.button if b.key.startswith("rollback-concept")).click().run()
    assert "bit-exact" in "\n".join(str(s.value) for s in at.success)
    at.switch_page("pages/compare.py").run()
    assert not at.exception
    assert "Rank-k conjugation" in at.get("plotly_chart")[0].proto.spec
    assert "Modules conjugated" in "\n".join(str(c.value) for c in at.caption)
