"""Sweeps on Ray (engine/running/cells.py, engine/running/ray_cells.py), on a local Ray with 2 CPUs:
T8 and T9 give the in-process results to the bit, a killed worker's cell is retried once and then
reported failed without hanging, a cancel kills the workers, a cell's own error comes back as
it would in process, and the default path never imports Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.api import ModelSpec, RunOptions, run_tool  # noqa: F401  (registers every tool on workers too)
from engine.core.errors import Cancelled, GraftError
from engine.core.progress import Progress, silent
from engine.loading.models import ModelStore
from engine.running.cells import run_cells
from engine.running.context import ToolContext

ray = pytest.importorskip("ray")  # pinned in requirements.txt: make test always has it

ROOT = Path(__file__).resolve().parent.parent
PAIR = dict(donor=ModelSpec.parse("tiny-gpt2-a"), target=ModelSpec.parse("tiny-gpt2-b"))


@pytest.fixture(scope="module")
def local_ray():
    # address="local": a Ray of its own, never a cluster that `ray start` (or an earlier test) left
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def ctx(local_ray):
    store = ModelStore()
    donor, target = (store.get(PAIR[r], "cpu", "float32", silent()) for r in ("donor", "target"))
    return ToolContext(donor, target, None, RunOptions(ray="auto"), store=store, tool="sweep-k")


# ----------------------------------------------------------------- cell functions the workers import
def marked_cell(ctx, shared, cell, progress):
    """Dies (the whole worker process) when the cell says so: once, or every time."""
    marker = Path(shared["dir"]) / f"{cell['i']}.started"
    if cell.get("die") == "always" or (cell.get("die") == "once" and not marker.exists()):
        marker.touch()
        os._exit(1)
    return {"i": cell["i"], "pid": os.getpid(), "layers": ctx.target.arch.n_layers}


def slow_cell(ctx, shared, cell, progress):
    (Path(shared["dir"]) / f"{os.getpid()}.pid").write_text(str(os.getpid()))
    time.sleep(120)
    return {}


def failing_cell(ctx, shared, cell, progress):
    raise GraftError(f"--k-grid names no module {cell['i']}")


# ----------------------------------------------------------------------------------------- tests
def test_t8_on_ray_equals_in_process_to_the_bit(local_ray, sets, one_thread):
    params = {"k_grid": "0,1,2,8", **sets}
    here = run_tool("sweep-k", options={"max_tokens": 256}, params=params, **PAIR)
    there = run_tool("sweep-k", options={"max_tokens": 256, "ray": "auto"}, params=params, **PAIR)
    assert there["result"] == here["result"]
    assert [p["k"] for p in there["result"]["points"]] == [0, 1, 2, 8]
    assert there["result"]["rollback_bit_exact"] and there["result"]["target_untouched"]
    meta = there["meta"]["ray"]
    assert meta["cells"] == 3 and meta["workers"] == 2 and meta["failed"] == [] and meta["retried"] == []
    assert "ray" not in here["meta"]


def test_t9_on_ray_equals_in_process_with_seeds(local_ray, tiny_organ, sets, workload, one_thread):
    kw = dict(target=PAIR["target"], organ=tiny_organ["path"])
    params = {"positions": "0,1", "strategy": "direct+recovery", "recovery_epochs": 1, "lr": 1e-2, "seeds": 2}
    params.update(sets)
    here = run_tool("position-sweep", options={"workload": workload}, params=params, **kw)
    there = run_tool("position-sweep", options={"workload": workload, "ray": "auto"}, params=params, **kw)
    assert there["result"] == here["result"]
    pts = there["result"]["points"]
    assert [p["position"] for p in pts] == [0, 1] and all(len(p["per_seed"]) == 2 for p in pts)
    assert pts[0]["per_seed"][0] != pts[0]["per_seed"][1]  # the seeds did train differently
    assert there["meta"]["ray"]["cells"] == 4


def test_t10_on_ray_equals_in_process(local_ray, tiny_organ, workload, one_thread):
    kw = dict(target=PAIR["target"], organ=tiny_organ["path"])
    params = {"positions": "0,1", "train_epochs": 1, "subsets": "0.5,1", "lr": 1e-2}
    here = run_tool("bridge-deviation", options={"workload": workload}, params=params, **kw)
    there = run_tool("bridge-deviation", options={"workload": workload, "ray": "auto"}, params=params, **kw)
    assert there["result"] == here["result"] and there["meta"]["ray"]["cells"] == 6
    devs = [p["dev_in"] for p in there["result"]["points"] if p["bridge"] == "trained"]
    assert len(devs) == 4 and all(d > 0 for d in devs)  # trained bridges moved from the identity


def test_a_killed_worker_is_retried_once_then_reported_failed(ctx, tmp_path):
    cells = [{"i": 0}, {"i": 1, "die": "once"}, {"i": 2, "die": "always"}, {"i": 3}]
    seen: list[str] = []
    t0 = time.time()
    out = run_cells(
        ctx,
        marked_cell,
        {"dir": str(tmp_path)},
        cells,
        Progress(lambda f, m: seen.append(m)),
        lambda c: f"cell {c['i']}",
    )
    assert time.time() - t0 < 120  # never hangs
    assert [r and r["i"] for r in out.results] == [0, 1, None, 3]
    assert set(out.failed) == {2} and "died twice" in out.failed[2]
    assert ctx.meta["notes"] == [f"1 of 4 cells have no numbers: {out.failed[2]}"]
    assert sorted(ctx.meta["ray"]["retried"]) == ["cell 1", "cell 2"]
    assert all(r["layers"] == ctx.target.arch.n_layers for r in out.results if r)  # the recipe's model
    assert any("(4/4 cells)" in m for m in seen) and any("cell 2: failed" in m for m in seen)


def test_a_cancel_kills_the_workers(ctx, tmp_path):
    progress = Progress()
    cells = [{"i": i} for i in range(4)]

    def cancel_when_running():
        t0 = time.time()
        while len(list(tmp_path.glob("*.pid"))) < 2 and time.time() - t0 < 90:
            time.sleep(0.1)
        progress.cancel()

    threading.Thread(target=cancel_when_running, daemon=True).start()
    t0 = time.time()
    with pytest.raises(Cancelled):
        run_cells(ctx, slow_cell, {"dir": str(tmp_path)}, cells, progress, lambda c: f"cell {c['i']}")
    assert time.time() - t0 < 100
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids), "a worker still runs after the cancel"


def test_a_cells_own_error_comes_back_as_in_process(ctx):
    with pytest.raises(GraftError, match="--k-grid names no module 0"):
        run_cells(ctx, failing_cell, {}, [{"i": 0}], silent(), str)


def test_t8_from_the_cli_on_its_own_local_ray(local_ray, tmp_path, sets, one_thread):
    """`python -m engine sweep-k --ray auto` starts a Ray of its own, reports each cell as it
    finishes and writes the in-process result (workers and this process on one thread each)."""
    out = tmp_path / "t8.json"
    args = ["--k-grid", "0,1,4", "--concept", sets["concept"], "--retained", sets["retained"]]
    r = subprocess.run(
        [sys.executable, "-m", "engine", "sweep-k", "--donor", "tiny-gpt2-a", "--target", "tiny-gpt2-b",
         "--max-tokens", "256", *args, "--ray", "auto", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(2/2 cells)" in r.stderr
    there = json.loads(out.read_text())
    params = {"k_grid": "0,1,4", **sets}
    here = run_tool("sweep-k", options={"max_tokens": 256}, params=params, **PAIR)
    assert there["result"] == here["result"] and there["meta"]["ray"]["workers"] >= 1


def test_ray_address_joins_a_running_cluster(tmp_path):
    """`--ray host:port` joins a cluster started apart (`ray start --head`, token authentication
    on, as Ray starts it by default); its whole process group is killed after."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--num-cpus", "1", "--port", str(port), "--include-dashboard", "false",
         "--block"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        t0 = time.time()
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() - t0 < 90, "the Ray head did not come up"
                time.sleep(0.5)
        out = tmp_path / "t8.json"
        env = {**os.environ, "RAY_AUTH_MODE": "token"}  # Ray 2.60: a driver joining a cluster opts in
        r = subprocess.run(
            [sys.executable, "-m", "engine", "sweep-k", "--donor", "tiny-gpt2-a", "--target", "tiny-gpt2-b",
             "--k-grid", "0,1", "--max-tokens", "128", "--ray", f"127.0.0.1:{port}", "--json", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        meta = json.loads(out.read_text())["meta"]["ray"]
        assert meta["address"].endswith(f":{port}") and meta["cells"] == 1 and meta["workers"] == 1
    finally:
        os.killpg(head.pid, signal.SIGKILL)


def test_bad_ray_values_are_one_line_errors_before_any_load():
    for bad in ("yes please", "http://x", "host:99999999"):
        with pytest.raises(GraftError, match="--ray expects auto"):
            run_tool("sweep-k", options={"ray": bad}, **PAIR)
    r = subprocess.run(
        [sys.executable, "-m", "engine", "sweep-k", "--donor", "tiny-gpt2-a", "--target", "tiny-gpt2-b",
         "--ray", "not an address"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode != 0 and "--ray expects auto" in r.stderr and "Traceback" not in r.stderr


def test_the_default_path_never_imports_ray():
    code = "import json, sys, engine.api, engine.cli, viz; print(json.dumps('ray' in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) is False


def test_t8_from_the_app_runs_on_ray_and_is_recorded(local_ray, home):
    """The sidebar's Run options take --ray too: a T8 started from the Transplant page runs its K
    values on the Ray workers, and the run history records where they ran."""
    from test_app import has_chart, run_until, shown, texts
    from test_app_hardening import open_app

    from engine.running.history import History

    at = open_app({"donor": "tiny-gpt2-a", "target": "tiny-gpt2-b"}, "pages/transplant.py")
    at.text_input(key="opt-ray").set_value("a cluster please").run()
    assert "--ray expects auto" in shown(texts(at.sidebar.error))  # one line in the sidebar, no run
    at.text_input(key="opt-ray").set_value("auto").run()
    assert not at.sidebar.error
    at.text_input(key="param-sweep-k-k_grid").set_value("0,1,2").run()
    at.button(key="run-sweep-k").click().run()
    run_until(at, has_chart, timeout=180)
    assert not at.exception and not at.error, texts(at.error)
    (row,) = History().list(tool="sweep-k")
    envelope = History().get(row["id"])["result"]
    assert [p["k"] for p in envelope["result"]["points"]] == [0, 1, 2]
    assert envelope["meta"]["ray"]["cells"] == 2 and envelope["meta"]["options"]["ray"] == "auto"


def test_worker_plan_fills_gpus_by_memory_and_cpus_by_count(monkeypatch):
    """An actor per GPU, or 1/k of one when k copies of the models fit its memory; an actor per
    CPU otherwise; never more than the cluster's memory holds, nor more than the cells."""
    import types

    from engine.running import ray_cells
    from engine.running.cells import Recipe

    def cluster(res):
        monkeypatch.setattr(ray_cells.ray, "cluster_resources", lambda: res)

    gpu = types.SimpleNamespace(total_memory=80 * 2**30)
    monkeypatch.setattr(ray_cells.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray_cells.torch.cuda, "get_device_properties", lambda i: gpu)
    auto, cpu = Recipe("sweep-k", {"device": "auto"}), Recipe("sweep-k", {"device": "cpu"})
    cluster({"CPU": 32.0, "GPU": 2.0, "memory": 200 * 2**30})
    n, opts = ray_cells.plan_workers(auto, 100, 10 * 2**30)  # 15 GiB a worker: 4 fit in 72 GiB
    assert (n, opts["num_gpus"]) == (8, 0.25)
    n, opts = ray_cells.plan_workers(auto, 100, 40 * 2**30)  # 60 GiB: one a GPU
    assert (n, opts["num_gpus"]) == (2, 1.0)
    n, opts = ray_cells.plan_workers(cpu, 5, 10 * 2**30)  # --device cpu: CPUs, capped by the cells
    assert n == 5 and "num_gpus" not in opts and opts["num_cpus"] == 1
    cluster({"CPU": 16.0, "memory": 4 * 2**30})
    assert ray_cells.plan_workers(auto, 100, 2**30)[0] == 2  # 1.5 GiB a worker in 4 GiB
    with pytest.raises(GraftError, match="no room for one worker"):
        ray_cells.plan_workers(auto, 100, 4 * 2**30)
    with pytest.raises(GraftError, match="cluster has no GPU"):
        ray_cells.plan_workers(Recipe("sweep-k", {"device": "cuda"}), 4, 2**30)


def test_t9_from_the_organs_page_runs_on_ray(local_ray, home, one_thread):
    """The Organs page: extract an organ, then T9 with the sidebar's ray = auto runs its positions
    on the workers, with the in-process result."""
    from test_app import open_app, run_until

    from engine.running.history import History

    at = open_app("pages/organs.py", donor="tiny-gpt2-a", target="tiny-gpt2-b")
    at.button(key="run-organ-extract").click().run()
    run_until(at, lambda a: len(a.get("plotly_chart")) >= 1)
    at.run()
    at.text_input(key="opt-ray").set_value("auto").run()
    at.button(key="run-position-sweep").click().run()
    run_until(at, lambda a: any("Position sensitivity" in ch.proto.spec for ch in a.get("plotly_chart")), 180)
    assert not at.exception, [e.value for e in at.exception]
    (row,) = History().list(tool="position-sweep")
    there = History().get(row["id"])["result"]
    assert there["meta"]["ray"]["cells"] == len(there["result"]["points"]) >= 1
    here = run_tool(
        "position-sweep",
        target=PAIR["target"],
        organ=there["organ"],
        options={**there["meta"]["options"], "ray": ""},
        params=there["meta"]["params"],
    )
    assert here["result"] == there["result"]
