"""T2-T4's linear algebra follows the models onto CUDA (engine.linalg.compute_device).

The placement rule is checked everywhere (with CUDA's memory query stubbed); the GPU results are
checked against the CPU's where a GPU is present (the device machine of a session that had one)."""
from __future__ import annotations

import math

import pytest
import torch

from engine import linalg
from engine.models import ModelSpec
from engine.runner import run_tool


def test_linear_algebra_goes_to_cuda_only_when_the_rows_fit(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert linalg.compute_device(cpu, 10) == cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4_000, 80_000))
    assert linalg.compute_device(gpu, 1_000) == gpu  # 4 x 1,000 bytes fit in 4,000 free
    assert linalg.compute_device(gpu, 1_001) == cpu  # they do not: the CPU, never an out-of-memory error
    assert linalg.compute_device(cpu, 1) == cpu  # models on the CPU keep their rows there


def test_ieee_float32_restores_the_callers_precision():
    prev = torch.get_float32_matmul_precision()
    with linalg.ieee_float32(torch.device("cpu")):  # nothing to do off CUDA
        assert torch.get_float32_matmul_precision() == prev
    torch.set_float32_matmul_precision("high")
    try:
        with linalg.ieee_float32(torch.device("cuda", 0)):
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(prev)


def _leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pair", [("tiny-gpt2-a", "tiny-gpt2-b"), ("tiny-gpt2-a", "tiny-llama-b")])
def test_t2_to_t4_on_cuda_equal_the_cpu(pair, workload, monkeypatch):
    """The same captured rows (forward passes on the CPU) through T2-T4's linear algebra on the CPU
    and on CUDA, with TF32 allowed process-wide during the CUDA run: the ieee_float32 guard must keep
    CKA's float32 Gram blocks and T3/T4's float32 products exact."""
    import engine.context as context
    import engine.tools.bridge as bridge
    import engine.tools.procrustes as procrustes
    from engine.capture import CaptureCache

    specs = ModelSpec.parse(pair[0]), ModelSpec.parse(pair[1])
    opts = {"device": "cpu", "workload": workload}
    tools = ("cka", "procrustes", "bridge-check")
    cpu = {t: run_tool(t, *specs, opts, captures=CaptureCache())["result"] for t in tools}
    on_cuda = lambda ctx, al: torch.device("cuda")  # noqa: E731
    for mod in (context, bridge, procrustes):
        monkeypatch.setattr(mod, "linalg_device", on_cuda)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 on: a host program's choice must not change the numbers
    try:
        gpu = {t: run_tool(t, *specs, opts, captures=CaptureCache())["result"] for t in tools}
    finally:
        torch.set_float32_matmul_precision(prev)
    for t in tools:
        a_leaves, b_leaves = dict(_leaves(cpu[t])), dict(_leaves(gpu[t]))
        assert a_leaves.keys() == b_leaves.keys()
        for k, a in a_leaves.items():
            b = b_leaves[k]
            if isinstance(a, float) and not (math.isnan(a) and math.isnan(b)):
                assert abs(a - b) <= 2e-6, (t, k, a, b)  # results are rounded to 6 decimals
            elif not isinstance(a, float):
                assert a == b, (t, k, a, b)
