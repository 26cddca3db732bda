"""The Streamlit app, driven headless with AppTest on the tiny random pair (seconds per test)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
TINY = ("tiny-gpt2-a", "tiny-gpt2-b")
PAGES = (
    "pages/home.py",
    "pages/models.py",
    "pages/alignment.py",
    "pages/concept.py",
    "pages/transplant.py",
    "pages/compare.py",
    "pages/runs.py",
)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GRAFT_HOME", str(tmp_path / "graft"))
    return tmp_path / "graft"


@pytest.fixture
def no_demo(tmp_path, monkeypatch) -> Path:
    """An empty model cache: the state of a fresh clone before the demo donor is built."""
    monkeypatch.setenv("GRAFT_MODELS_HOME", str(tmp_path / "models"))
    return tmp_path / "models"


def open_app(page: str = "pages/home.py", donor: str = TINY[0], target: str = TINY[1]) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["donor"] = donor
    at.query_params["target"] = target
    at.run()
    if page != "pages/home.py":
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def picker(at: AppTest, role: str):
    """The sidebar's model selectbox for ``role`` ("donor" or "target")."""
    return next(s for s in at.sidebar.selectbox if s.label == role.capitalize())


def run_until(at: AppTest, done, timeout: float = 60.0) -> AppTest:
    """Rerun the script (what the polling fragment does in a browser) until ``done(at)``."""
    t0 = time.time()
    while not done(at):
        assert time.time() - t0 < timeout, "the job did not finish in time"
        assert not at.exception, [e.value for e in at.exception]
        time.sleep(0.2)
        at.run()
    return at


def with_pair_loaded(at: AppTest, timeout: float = 300.0) -> AppTest:
    """The sidebar loads the chosen pair in the background (engine/loading/preload.py) and draws the T1
    badge on the run after: wait for both loads, then rerun (what the badge's polling does)."""
    from engine.loading.models import ModelSpec
    from ui.state import preloader

    for role in ("donor", "target"):
        state = preloader().request(ModelSpec.parse(at.session_state[role]), wait_s=timeout)
        assert state.state == "loaded", state
    return at.run()


def has_chart(at: AppTest) -> bool:
    return len(at.get("plotly_chart")) > 0


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def shown(source: object) -> str:
    """Markdown source as the reader sees its text: code-span fences dropped and backslash escapes
    undone (the app escapes model names, paths and messages with ui.text.md)."""
    s = re.sub(r"(?<!\\)(`+) ?(.+?) ?\1(?!`)", r"\2", str(source))
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", s)


# --------------------------------------------------------------------------- every page
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_the_tiny_pair(home, page):
    at = open_app(page)
    assert at.session_state["donor"] == TINY[0] and at.session_state["target"] == TINY[1]
    assert not at.error, texts(at.error)
    assert at.title, "every page has a title"


def _generic_page_script(page_name: str) -> None:
    from ui.toolpage import render_tool_page

    render_tool_page(page_name)


def test_a_tool_registered_on_a_page_without_a_file_gets_a_generic_page(home, monkeypatch):
    """A newly registered tool shows up in the app without touching the UI."""
    import dataclasses

    from engine.running import registry
    from ui.navigation import FILE_PAGES, tool_page_names

    extra = dataclasses.replace(registry.get_tool("compat"), name="compat-copy", code="T99", page="Scratch")
    monkeypatch.setitem(registry._REGISTRY, extra.name, extra)
    assert "Scratch" in tool_page_names() and "Scratch" not in FILE_PAGES
    at = AppTest.from_function(_generic_page_script, args=("Scratch",), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    assert [b.label for b in at.button if b.key and b.key.startswith("run-")] == ["Run T99"]


def test_first_visit_sees_start_here_and_the_tiny_pair_with_a_build_note(home, no_demo):
    at = AppTest.from_file(APP, default_timeout=120).run()  # no query params: defaults
    assert not at.exception
    assert "Start here" in texts(at.markdown)
    assert (at.session_state["donor"], at.session_state["target"]) == TINY
    with_pair_loaded(at)
    sidebar = texts(at.sidebar.markdown) + texts(at.sidebar.caption)
    assert "module swap ✓" in sidebar  # T1 badge once the pair has loaded
    assert "demo pair" in sidebar  # the note saying why the tiny pair is selected
    assert any(b.key == "build-demo-sidebar" for b in at.sidebar.button)


def test_query_params_preselect_and_session_state_follows(home):
    at = open_app(donor="tiny-llama-a", target="tiny-gpt2-b")
    assert picker(at, "donor").value == "tiny-llama-a"
    assert picker(at, "target").value == "tiny-gpt2-b"
    # Different families: no module swap, shown as a red badge.
    assert "module swap ✗" in texts(with_pair_loaded(at).sidebar.markdown)
    picker(at, "donor").set_value("tiny-gpt2-a").run()
    assert at.session_state["donor"] == "tiny-gpt2-a"
    at.sidebar.button(key="swap-models").click().run()
    assert (at.session_state["donor"], at.session_state["target"]) == ("tiny-gpt2-b", "tiny-gpt2-a")
    assert picker(at, "donor").value == "tiny-gpt2-b"


# --------------------------------------------------------------------------- running tools
def test_alignment_cka_runs_in_the_background_and_shows_the_heatmap_then_runs_lists_it(home):
    at = open_app("pages/alignment.py")
    assert [b.key for b in at.button if b.key and b.key.startswith("run-")] == [
        "run-cka",
        "run-procrustes",
        "run-bridge-check",
    ]
    at.button(key="run-cka").click().run()
    assert not at.exception
    run_until(at, has_chart)
    assert not at.error, texts(at.error)
    assert any(m.label == "Mean matched CKA" for m in at.metric)
    assert {d.label for d in at.get("download_button")} >= {"Result JSON", "Figure HTML"}

    at.switch_page("pages/runs.py").run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["status"]) == ["done"]
    assert "Layer similarity" in table["tool"][0]
    assert table["donor"][0] == TINY[0] and table["target"][0] == TINY[1]
    assert has_chart(at), "the reopened run shows its figure"

    at.selectbox(key="runs_filter").set_value("procrustes").run()
    assert "No T3 Per-layer Procrustes residuals runs" in shown(
        texts(at.info)
    )  # others exist: not "no runs yet"
    at.selectbox(key="runs_filter").set_value("cka").run()
    at.button(key="delete-run").click().run()
    assert not at.exception
    assert "No runs yet" in texts(at.info)


def test_models_page_runs_t1_and_shows_verdicts_with_reasons(home):
    at = open_app("pages/models.py", donor="tiny-gpt2-a", target="tiny-llama-b")
    at.button(key="run-compat").click().run()
    run_until(at, has_chart)
    shown = texts(at.markdown) + texts(at.caption)
    assert "module swap ✗" in shown
    assert "different families" in shown  # the reason behind the verdict
    assert any(m.label == "Tokenizer overlap" for m in at.metric)


def test_failed_job_shows_its_one_line_error(home):
    from ui.state import job_runner

    at = open_app("pages/alignment.py")
    job = job_runner().submit("cka", "T2 test", TINY[0], TINY[1], {}, _fail)
    at.session_state["_last_jobs"] = {"cka": job.id}
    run_until(at, lambda a: len(a.error) > 0)
    assert len(at.error) == 1
    assert shown(at.error[0].value) == "T2 test failed: workload broken.jsonl line 3: missing text"


def test_a_running_job_shows_progress_and_can_be_cancelled(home):
    from ui.state import job_runner

    at = open_app("pages/alignment.py")
    job = job_runner().submit("procrustes", "T3 test", TINY[0], TINY[1], {}, _slow)
    at.session_state["_last_jobs"] = {"procrustes": job.id}
    run_until(at, lambda a: any(b.key == f"cancel-main-{job.id}" for b in a.button))
    assert at.get("progress"), "a progress bar while running"
    assert at.button(key="run-procrustes").disabled, "no second run of the same tool while one runs"
    at.button(key=f"cancel-main-{job.id}").click().run()
    run_until(at, lambda a: "was cancelled" in texts(a.info))
    assert job_runner().get(job.id).status == "cancelled"


def test_tool_parameters_come_from_their_widgets(home):
    from ui.state import job_runner

    at = open_app("pages/alignment.py")
    pairs = at.selectbox(key="param-procrustes-pairs")
    assert pairs.help.startswith("Which layer pairs to fit")  # help text from the params class
    pairs.set_value("depth").run()
    at.number_input(key="param-procrustes-heldout_fraction").set_value(0.5).run()
    at.button(key="run-procrustes").click().run()
    run_until(at, has_chart)
    params = job_runner().history.list(tool="procrustes")[0]["params"]["params"]
    assert params["pairs"] == "depth" and params["heldout_fraction"] == 0.5


def _fail(progress):
    from engine.core.errors import GraftError

    raise GraftError("workload broken.jsonl line 3: missing text")


def _slow(progress):
    for i in range(600):
        progress(i / 600, f"step {i}")
        time.sleep(0.05)
    return {}


def test_build_demo_donor_button_runs_a_background_job(home, no_demo, monkeypatch):
    import ui.demo

    def fake_build(progress):
        for i in range(5):
            progress(i / 5, f"training step {i}")
            time.sleep(0.05)
        return home / "models" / "fake-demo"

    monkeypatch.setattr(ui.demo, "prepare_demo_donor", fake_build)
    at = open_app("pages/models.py")
    at.sidebar.button(key="build-demo-sidebar").click().run()
    assert not at.exception
    run_until(at, lambda a: "Demo donor built." in texts(a.success))
    from ui.state import job_runner

    row = job_runner().history.list(tool="make-donor")[0]
    assert row["status"] == "done"


# --------------------------------------------------------------------------- bad input
def test_missing_donor_path_is_one_line_error_and_disables_run(home, tmp_path):
    missing = str(tmp_path / "no-such-model")
    at = open_app("pages/alignment.py", donor=missing)
    errors = [shown(e.value) for e in at.sidebar.error]
    assert errors == [f"Donor: model path not found: {missing}"]
    assert all("\n" not in e for e in errors)
    assert not at.exception
    assert at.button(key="run-cka").disabled


def test_folder_that_is_not_a_model_is_one_line_error(home, tmp_path):
    at = open_app("pages/models.py", target=str(tmp_path))
    assert len(at.sidebar.error) == 1
    assert "not a Hugging Face model folder" in at.sidebar.error[0].value
    assert not at.exception


def test_bad_workload_path_is_one_line_error(home, tmp_path):
    at = open_app("pages/alignment.py")
    at.sidebar.radio(key="workload_source").set_value("Path on this machine").run()
    at.sidebar.text_input(key="workload_path").input(str(tmp_path / "nope.jsonl")).run()
    assert not at.exception
    errors = [shown(e.value) for e in at.sidebar.error]
    assert len(errors) == 1 and errors[0].startswith("Workload:") and "\n" not in errors[0]
    assert at.button(key="run-cka").disabled


def test_workload_path_and_run_options_reach_the_job(home, workload):
    at = open_app("pages/alignment.py")
    at.sidebar.radio(key="workload_source").set_value("Path on this machine").run()
    at.sidebar.text_input(key="workload_path").input(workload).run()
    at.sidebar.number_input(key="opt-max_tokens").set_value(256).run()
    assert "workload · 10 texts" in texts(at.sidebar.caption)
    at.button(key="run-bridge-check").click().run()
    run_until(at, has_chart)
    from ui.state import job_runner

    row = job_runner().history.list()[0]
    assert row["params"]["options"]["workload"] == workload
    assert row["params"]["options"]["max_tokens"] == 256


def test_uploads_are_saved_under_graft_home_without_overwriting(home):
    from ui.sidebar import save_upload

    a = save_upload("../../my texts.txt", b"one\ntwo\n")
    assert a == home / "uploads" / "my_texts.txt"
    assert save_upload("my texts.txt", b"one\ntwo\n") == a  # the same file again is reused
    b = save_upload("my texts.txt", b"three\n")
    assert b == home / "uploads" / "my_texts-1.txt"
    assert a.read_bytes() == b"one\ntwo\n" and b.read_bytes() == b"three\n"


@pytest.mark.real
def test_first_visit_with_the_demo_built_selects_the_demo_pair(home):
    from engine.loading.models import DEMO_DONOR, SMOLLM2
    from ui.demo import demo_pair_ready

    assert demo_pair_ready(), "`make prepare` builds SmolLM2 and the demo donor before the tests"
    at = AppTest.from_file(APP, default_timeout=300).run()
    assert not at.exception, [e.value for e in at.exception]
    assert (at.session_state["donor"], at.session_state["target"]) == (DEMO_DONOR, SMOLLM2)
    with_pair_loaded(at)
    assert "module swap ✓" in texts(at.sidebar.markdown) + texts(at.sidebar.caption)


def test_models_page_shows_the_memory_plan_and_the_sidebar_the_route(home):
    at = open_app("pages/models.py", donor="tiny-gpt2-a", target="tiny-llama-b")
    assert "Memory plan" in texts(at.markdown)
    labels = {m.label: m.value for m in at.metric}
    assert labels.get("Route") == "held whole" and "Bytes to read" in labels and "Peak memory" in labels
    assert "Estimated time" in labels
    assert "the pair is held whole" in texts(at.sidebar.caption)
    # a budget no run fits: the page says so in one line before anything runs
    at.sidebar.text_input(key="opt-max_memory").set_value("100MiB").run()
    assert any("over the" in e.value and "budget" in e.value for e in at.error), [e.value for e in at.error]


def test_models_page_shows_what_accelerate_would_place_where(home, tmp_path):
    """--stream dispatch on two model folders: the plan's route and each model's bytes per tier."""
    from engine.loading.tiny import build_tiny

    paths = []
    for name in ("tiny-llama-a", "tiny-llama-b"):
        model, tok = build_tiny(name)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        paths.append(str(tmp_path / name))
    at = open_app("pages/models.py", donor=paths[0], target=paths[1])
    at.sidebar.selectbox(key="opt-stream").set_value("dispatch").run()
    assert not at.exception, [e.value for e in at.exception]
    labels = {m.label: m.value for m in at.metric}
    assert labels.get("Route") == "accelerate", labels
    assert "placed by accelerate across devices" in texts(at.sidebar.caption)
    table = at.dataframe[0].value
    assert {"on device", "on cpu", "on disk"} <= set(table.columns)
