"""The page never waits: the engine is imported behind a painted heading, and the sidebar's pair
loads in the background (engine/loading/preload.py) with its state on screen."""

from __future__ import annotations

import threading

import pytest
from streamlit.testing.v1 import AppTest

import engine.loading.models
from engine.core.errors import GraftError
from engine.loading.models import ModelSpec, ModelStore
from engine.loading.preload import FAILED, LOADED, LOADING, Preloader
from tests.test_app import APP, TINY, texts

SPEC = ModelSpec.parse("tiny-gpt2-a")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFT_HOME", str(tmp_path / "graft"))
    return tmp_path / "graft"


@pytest.fixture
def gated_load(monkeypatch):
    """load_model blocks until the test opens the gate; counts calls; can be told to fail."""
    real = engine.loading.models.load_model
    gate = threading.Event()
    calls: list[str] = []
    fail: list[Exception] = []

    def load(spec, device="auto", dtype="float32", progress=None):
        calls.append(spec.ref)
        assert gate.wait(30), "the test never opened the gate"
        if fail:
            raise fail.pop()
        return real(spec, device, dtype, progress)

    monkeypatch.setattr(engine.loading.models, "load_model", load)
    return gate, calls, fail


def test_preloader_loads_in_the_background_and_a_job_meanwhile_shares_the_load(gated_load):
    gate, calls, _ = gated_load
    store = ModelStore()
    pre = Preloader(store)
    assert pre.state(SPEC) is None  # nobody asked yet
    first = pre.request(SPEC, wait_s=0.05)
    assert (
        first.state == LOADING and first.seconds >= 0.05
    )  # it waited wait_s for the gated load, and said so
    assert pre.request(SPEC).state == LOADING  # a second request starts no second load
    got: list = []
    job = threading.Thread(target=lambda: got.append(store.get(SPEC)))  # a job needing the same model
    job.start()
    gate.set()
    job.join(30)
    assert pre.request(SPEC, wait_s=30).state == LOADED
    assert calls == ["tiny-gpt2-a"]  # loaded once, for both
    assert got[0] is store.get(SPEC)


def test_preloader_reports_a_failed_load_in_one_line_and_can_retry(gated_load):
    gate, calls, fail = gated_load
    fail.append(GraftError("model folder is gone: /nowhere\nsecond line of detail"))
    gate.set()
    pre = Preloader(ModelStore())
    state = pre.request(SPEC, wait_s=30)
    # one line: a GraftError writes its line breaks as escapes (engine.core.errors.printable_line)
    assert state.state == FAILED and state.message == "model folder is gone: /nowhere\\nsecond line of detail"
    assert pre.request(SPEC, wait_s=0.1).state == FAILED  # a failure is not retried by itself
    pre.retry(SPEC)
    assert pre.request(SPEC, wait_s=30).state == LOADED
    assert len(calls) == 2


def test_a_fresh_process_paints_the_heading_then_imports_the_engine(home, monkeypatch):
    import ui.boot

    monkeypatch.setattr(ui.boot, "_ready", False)
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["donor"], at.query_params["target"] = TINY
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert ui.boot.engine_ready() and ui.boot.import_seconds() is not None
    assert [t.value for t in at.title] == ["Graft"]  # the boot heading was cleared, the page drew its own
    assert "Start here" in texts(at.markdown)


def test_the_page_renders_while_the_pair_loads_and_the_badge_follows(home, gated_load):
    gate, _, _ = gated_load
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["donor"], at.query_params["target"] = TINY
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Start here" in texts(at.markdown)  # the page did not wait for the models
    sidebar = texts(at.sidebar.caption)
    assert "Loading the pair in the background" in sidebar and "module swap" not in texts(at.sidebar.markdown)
    gate.set()
    from ui.state import preloader

    for spec in (ModelSpec.parse(TINY[0]), ModelSpec.parse(TINY[1])):
        assert preloader().request(spec, wait_s=30).state == LOADED
    at.run()
    assert "module swap ✓" in texts(at.sidebar.markdown)


def test_a_pair_that_fails_to_load_says_why_in_the_sidebar(home, gated_load):
    gate, _, fail = gated_load
    fail.extend([GraftError("weights are truncated"), GraftError("weights are truncated")])
    gate.set()
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["donor"], at.query_params["target"] = TINY
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "did not load: weights are truncated" in texts(at.sidebar.caption)
    assert any(b.key == "preload-retry" for b in at.sidebar.button)


@pytest.mark.real
def test_the_demo_pair_loads_in_two_background_threads_at_once():
    """Both models of the demo pair requested together (what the sidebar does): two concurrent
    from_pretrained calls once failed with "Cannot copy out of meta tensor"; loads are serialised."""
    from engine.loading.models import DEMO_DONOR, SMOLLM2
    from ui.demo import demo_pair_ready

    assert demo_pair_ready(), "`make prepare` builds SmolLM2 and the demo donor before the tests"
    for _ in range(2):
        store = ModelStore()
        pre = Preloader(store)
        specs = [ModelSpec.parse(DEMO_DONOR), ModelSpec.parse(SMOLLM2)]
        for spec in specs:
            pre.request(spec)  # both threads start before either finishes
        states = [pre.request(spec, wait_s=300) for spec in specs]
        assert [s.state for s in states] == [LOADED, LOADED], states
        for spec in specs:
            assert all(p.device.type != "meta" for p in store.get(spec).model.parameters())
