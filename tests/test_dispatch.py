"""The dispatch route (engine/loading/dispatch.py, engine/running/dispatch_plan.py): models placed by
accelerate's device_map="auto" across the device, the CPU and disk give the results of the models
held whole; the plan picks it on a GPU only when the pair fits across GPU and host; tools that read
weights refuse it in one line; nothing is left on disk."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engine.core.errors import Cancelled, GraftError
from engine.core.progress import Progress
from engine.loading.dispatch import offload_leftovers
from engine.loading.models import ModelSpec, load_model
from engine.measure.capture_cache import capture_model
from engine.running import memplan
from engine.running.memplan import plan_run
from engine.running.runner import run_tool
from tests.test_streaming import _close, save_tiny

TEXTS = [
    "The cat sat on the mat.",
    "Paris is the capital of France, and a big city.",
    "hello",
    "Water boils at one hundred degrees Celsius at sea level, and freezes at zero.",
]
MIB = 1024**2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny(tmp_path_factory, ("tiny-llama-a", "tiny-llama-b", "tiny-gpt2-a"))


@pytest.mark.parametrize("name", ["tiny-llama-a", "tiny-gpt2-a"])
def test_placed_across_cpu_and_disk_the_rows_equal_the_whole_model(folders, name, one_thread):
    spec = ModelSpec.parse(folders[name])
    whole = load_model(spec, "cpu", "float32")
    total = sum(p.numel() * 4 for p in whole.model.parameters())
    placed = load_model(spec, "cpu", "float32", dispatch={"cpu": total // 2})
    assert placed.dispatched and not placed.streamed
    where = set(placed.placement["device_map"].values())
    assert "disk" in where, placed.placement  # the budget holds half of it: the rest stays in the shards
    assert placed.placement["bytes"]["disk"] > 0
    assert any(p.device.type == "meta" for p in placed.model.parameters())
    a = capture_model(whole, TEXTS)
    b = capture_model(placed, TEXTS)
    assert torch.allclose(a.residual, b.residual, atol=1e-5, rtol=0)
    with pytest.raises(GraftError, match="not held whole"):
        placed.state_hash()
    assert offload_leftovers() == []  # served from the folder's own shards: nothing was written


def _budget_for_half(specs, module_rows: bool, tool_tokens=64):
    """A --max-memory that keeps about half the pair on the host and the rest on disk."""
    roomy = plan_run(
        specs, dtype="float32", device=torch.device("cpu"), tokens=tool_tokens, max_memory="64GiB",
        stream="dispatch", dispatches=True, module_rows=module_rows,
    )  # fmt: skip
    assert roomy.route == "dispatch" and sum(m["disk_bytes"] for m in roomy.placement) == 0
    models = sum(m["cpu_bytes"] for m in roomy.placement)
    return str(roomy.peak_bytes - models // 2)


@pytest.mark.parametrize("tool", ["cka", "procrustes", "bridge-check", "rank-modules"])
def test_t2_t3_t4_t7_dispatched_equal_in_memory(folders, workload, tool, one_thread):
    pair = ("tiny-llama-a", "tiny-llama-b")
    d, t = (ModelSpec.parse(folders[p]) for p in pair)
    whole = run_tool(tool, d, t, {"workload": workload, "stream": "off", "device": "cpu", "max_tokens": 64})
    budget = _budget_for_half([d, t], module_rows=tool == "rank-modules")
    opts = {
        "workload": workload,
        "stream": "dispatch",
        "device": "cpu",
        "max_tokens": 64,
        "max_memory": budget,
    }
    env = run_tool(tool, d, t, opts)
    json.dumps(env, allow_nan=False)
    plan = env["meta"]["memory_plan"]
    assert plan["route"] == "dispatch" and plan["fits"]
    assert sum(m["disk_bytes"] for m in plan["placement"]) > 0
    placed = env["meta"]["placement"]
    assert len(placed) == 2 and any(p["bytes"]["disk"] > 0 for p in placed.values())
    _close(whole["result"], env["result"])
    assert offload_leftovers() == []


def test_a_placed_pair_is_reused_by_the_next_run_with_the_same_budget(folders, workload, one_thread):
    from engine.loading.models import ModelStore

    d, t = ModelSpec.parse(folders["tiny-llama-a"]), ModelSpec.parse(folders["tiny-llama-b"])
    store = ModelStore()
    opts = {"workload": workload, "stream": "dispatch", "device": "cpu", "max_tokens": 64}
    run_tool("cka", d, t, opts, store=store)
    first = store.loaded()
    assert len(first) == 2 and all("dispatch" in str(k) for k in first)
    run_tool("procrustes", d, t, opts, store=store)  # the plan's map may differ: the models do not move
    assert store.loaded() == first
    run_tool("procrustes", d, t, {**opts, "max_memory": "64GiB"}, store=store)  # a new budget: placed anew
    assert len(store.loaded()) == 4


def test_tools_that_read_weights_refuse_dispatch_in_one_line(folders, workload):
    d, t = ModelSpec.parse(folders["tiny-llama-a"]), ModelSpec.parse(folders["tiny-llama-b"])
    for tool in ("compat", "swap", "sweep-k"):
        with pytest.raises(GraftError, match="--stream dispatch runs T2, T3, T4 and T7"):
            run_tool(tool, d, t, {"workload": workload, "stream": "dispatch", "device": "cpu"})
    tiny = ModelSpec.parse("tiny-llama-a")
    with pytest.raises(GraftError, match="accelerate places model folders"):
        run_tool("cka", tiny, t, {"workload": workload, "stream": "dispatch", "device": "cpu"})
    placed = load_model(d, "cpu", "float32", dispatch={"cpu": 64 * MIB})
    with pytest.raises(GraftError, match="accelerate placed it"):
        run_tool("swap", placed, t, {"workload": workload, "device": "cpu"})
    r = subprocess.run(
        [sys.executable, "-m", "engine", "swap", "--donor", folders["tiny-llama-a"], "--target",
         folders["tiny-llama-b"], "--stream", "dispatch", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "dispatch" in lines[0], r.stderr


def test_a_cancel_mid_pass_leaves_the_placed_model_working(folders, one_thread):
    spec = ModelSpec.parse(folders["tiny-llama-a"])
    placed = load_model(spec, "cpu", "float32", dispatch={"cpu": 0})  # all of it served from disk
    assert set(placed.placement["device_map"].values()) == {"disk"}
    calls = []

    def cb(frac, msg):
        calls.append(msg)
        if len(calls) == 2:
            pr.cancel()

    pr = Progress(cb)
    with pytest.raises(Cancelled):
        capture_model(placed, TEXTS, batch_size=1, progress=pr)
    assert offload_leftovers() == []
    assert all(p.device.type == "meta" for p in placed.model.parameters())  # nothing stayed loaded
    whole = load_model(spec, "cpu", "float32")
    assert torch.allclose(
        capture_model(placed, TEXTS).residual, capture_model(whole, TEXTS).residual, atol=1e-5
    )


def _gpu_plan(specs, monkeypatch, *, gpu: int, host: int, **kw):
    """The plan a run on a GPU would get, on this machine: the device's budget and the host's memory
    are given, and the multiply-add rate is measured on the CPU (no CUDA call is made)."""
    monkeypatch.setattr(memplan, "available_bytes", lambda dev: host)
    monkeypatch.setattr(memplan, "flops_per_second", lambda dtype, dev: 1e10)
    args = dict(dtype="float32", device=torch.device("cuda", 0), tokens=100_000, max_memory=str(gpu))
    return plan_run(specs, **{**args, **kw})


def test_on_a_gpu_auto_places_a_pair_that_fits_across_gpu_and_host(folders, monkeypatch):
    specs = [ModelSpec.parse(folders["tiny-llama-a"]), ModelSpec.parse(folders["tiny-llama-b"])]
    big = 64 * 1024**3
    roomy = _gpu_plan(specs, monkeypatch, gpu=big, host=big, dispatches=True)
    assert roomy.route == "whole"  # it fits the GPU whole: nothing to place
    sizes = {m["label"]: m["in_run_dtype_bytes"] for m in roomy.models}
    pair = sum(sizes.values())
    # a GPU budget that holds the workload's activations and about half the pair: placed, not streamed
    probe = _gpu_plan(specs, monkeypatch, gpu=big, host=big, dispatches=True, stream="dispatch")
    reserve = probe.peak_bytes - pair  # activations and one block, beside the weights
    gpu = reserve + pair // 2
    placed = _gpu_plan(specs, monkeypatch, gpu=gpu, host=big, dispatches=True)
    assert placed.route == "dispatch" and placed.fits, placed.lines
    on_gpu = sum(m["device_bytes"] for m in placed.placement)
    on_cpu = sum(m["cpu_bytes"] for m in placed.placement)
    assert 0 < on_gpu < pair and on_gpu + on_cpu == pair
    assert sum(m["disk_bytes"] for m in placed.placement) == 0
    for m in placed.placement:  # each model's share in proportion to its size
        assert set(m["max_memory"]) == {"cuda:0", "cpu"}
        free = gpu - reserve - max(x["largest_block_bytes"] for x in placed.models)  # one block runs there
        assert m["max_memory"]["cuda:0"] == pytest.approx(free * sizes[m["label"]] / pair, abs=2)
    assert "placed by accelerate" in placed.lines[0] and "on device" in placed.lines[0]
    # a tool that reads weights, or a host that cannot take the rest: streamed block by block
    assert _gpu_plan(specs, monkeypatch, gpu=gpu, host=big, dispatches=False).route == "stream"
    assert _gpu_plan(specs, monkeypatch, gpu=gpu, host=64 * MIB, dispatches=True).route == "stream"
    # --stats streamed asks for the lean route, which reads the models block by block
    lean = _gpu_plan(specs, monkeypatch, gpu=gpu, host=big, dispatches=True, lean=True, stats="streamed")
    assert lean.route == "stream"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_placed_across_gpu_and_cpu_equals_the_whole_model_on_the_gpu(folders, dtype):
    spec = ModelSpec.parse(folders["tiny-llama-a"])
    whole = load_model(spec, "cuda", dtype)
    total = sum(p.numel() * p.element_size() for p in whole.model.parameters())
    placed = load_model(spec, "cuda", dtype, dispatch={"cuda:0": total // 2, "cpu": 64 * MIB})
    assert placed.device.type == "cuda" and placed.placement["bytes"]["cpu"] > 0
    a, b = capture_model(whole, TEXTS), capture_model(placed, TEXTS)
    assert torch.allclose(a.residual, b.residual, atol=1e-5 if dtype == "float32" else 1e-2, rtol=0)
