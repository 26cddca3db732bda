"""The life of long work: a cancel says what happened, a cancelled run keeps nothing in memory,
a queued job is cancelled at once, an evicted model takes its live transplants with it, and a
run whose process was killed is shown as such."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from engine.core.errors import Cancelled
from engine.core.progress import Progress
from engine.loading.models import ModelSpec, ModelStore
from engine.running.history import History, new_run_id
from engine.running.jobs import JobRunner
from engine.running.live import LiveTransplants
from engine.running.runner import run_tool

ROOT = Path(__file__).resolve().parent.parent

PAIR = ("tiny-gpt2-a", "tiny-gpt2-b")


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def test_a_queued_job_is_cancelled_at_once(home):
    runner = JobRunner(ModelStore(), History())
    gate = threading.Event()
    first = runner.submit("x", "blocking", "d", "t", {}, lambda p: (gate.wait(30), {})[1])
    second = runner.submit("x", "queued", "d", "t", {}, lambda p: {"ran": True})
    runner.cancel(second.id)
    # before the job ahead of it ends: cancelled in memory and in the history
    assert second.status == "cancelled" and runner.history.get(second.id)["status"] == "cancelled"
    assert first.status in ("queued", "running")
    gate.set()
    assert runner.wait(first.id).status == "done"
    assert runner.wait(second.id).status == "cancelled" and second.result is None
    assert runner.history.get(second.id)["status"] == "cancelled"


@pytest.mark.parametrize("tool,params", [("swap", {"k": 2}), ("organ-insert", None)])
def test_a_run_cancelled_at_its_last_step_keeps_no_transplant(home, sets, workload, tmp_path, tool, params):
    live = LiveTransplants()
    d, t = (ModelSpec.parse(x) for x in PAIR)
    kw = {}
    if tool == "organ-insert":
        run_tool(
            "organ-extract", d, options={}, params={"start": 1, "size": 1, "out": str(tmp_path / "organ")}
        )
        kw, d, params = {"organ": str(tmp_path / "organ")}, None, {"position": 1}
    event = threading.Event()

    def report(fraction: float, message: str) -> None:
        if message == "rolling back and verifying" or fraction >= 0.95:
            event.set()  # the user clicks Cancel as the run verifies its rollback

    with pytest.raises(Cancelled):
        run_tool(
            tool,
            d,
            t,
            {"workload": workload},
            {**params, **sets},
            live=live,
            progress=Progress(report, event),
            **kw,
        )
    assert live._items == {}


def test_a_save_cancelled_while_writing_reports_the_folder_it_wrote(monkeypatch, tmp_path):
    from ui import transplant

    event = threading.Event()
    out = tmp_path / "saved"

    def save(live_id, folder):  # the user clicks Cancel while the folder is being written
        event.set()
        folder.mkdir()
        return folder

    monkeypatch.setattr(transplant.LIVE, "save", save)
    result = transplant.save_work("run-1", "live-1", str(out))(Progress(None, event))
    assert result == {"saved_to": str(out), "swap_run": "run-1"} and out.is_dir()
    event.clear()
    monkeypatch.setattr(transplant.LIVE, "save", lambda *a: pytest.fail("nothing is written after a cancel"))
    event.set()
    with pytest.raises(Cancelled):  # a cancel before the write stops it
        transplant.save_work("run-1", "live-1", str(out))(Progress(None, event))


def test_an_evicted_target_takes_its_live_transplants_with_it(home, sets, workload):
    store, live = ModelStore(max_models=2), LiveTransplants()
    store.on_evict.append(live.drop_model)
    d, t = (store.get(ModelSpec.parse(x)) for x in PAIR)
    env = run_tool("swap", d, t, {"workload": workload}, {"k": 2, **sets}, live=live, store=store)
    live_id = env["result"]["live_id"]
    assert live.get(live_id) is not None
    store.get(ModelSpec.parse("tiny-llama-a"))  # evicts tiny-gpt2-a, then...
    assert live.get(live_id) is not None  # ...the donor went: the transplant (made on the target) stays
    store.get(ModelSpec.parse("tiny-llama-b"))  # evicts the target
    assert live.get(live_id) is None and live._items == {}


def test_the_runs_page_marks_a_killed_process_run_as_failed(home):
    import subprocess
    import sys
    import time

    from streamlit.testing.v1 import AppTest

    from engine.core.processes import process_start_time, this_host

    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=120)
    at.query_params["donor"], at.query_params["target"] = PAIR
    at.run()  # the app is up (its history was opened) before the CLI run starts and is killed
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=ROOT)
    try:
        owner = {"pid": child.pid, "host": this_host(), "started": process_start_time(child.pid)}
        h = History()
        rid = h.create(new_run_id("cli-"), "cka", "T2 Layer similarity", "d", "t", {}, owner=owner)
        h.start(rid)
    finally:
        child.kill()
        child.wait(30)
    time.sleep(0.2)
    at.switch_page("pages/runs.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert h.get(rid)["status"] == "failed" and "is gone" in h.get(rid)["error"]
    assert any(rid in str(i.value).replace("\\", "") for i in at.info)
