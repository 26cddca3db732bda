"""engine.core.threads: per-layer work side by side on a CPU's cores, one torch thread per worker, with the
same results as the plain loop (T3 and T4 end to end), progress and cancellation from the caller,
and torch's thread count restored whatever happens."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import engine.core.threads as th
import engine.running.bridge_fit as t4
import engine.tools.procrustes as t3
from engine.core.errors import Cancelled
from engine.core.progress import Progress, silent
from engine.measure.align import Aligned
from engine.measure.cka import cka_matrix


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_parallel_map_keeps_order_runs_single_threaded_workers_and_restores_the_thread_count(two_threads):
    seen: dict[int, tuple[str, int]] = {}

    def fn(k: int) -> int:
        time.sleep(0.01 * (5 - k))  # later items finish first: the order must still be the items'
        seen[k] = (threading.current_thread().name, torch.get_num_threads())
        return k * k

    messages = []
    out = th.parallel_map(
        fn, range(5), Progress(lambda f, m: messages.append((f, m))), lambda k: f"item {k}", workers=2
    )
    assert out == [k * k for k in range(5)]
    assert all(name.startswith("graft-linalg") for name, _ in seen.values())
    assert {n for _, n in seen.values()} == {1}  # never more busy threads than the process was given
    assert torch.get_num_threads() == 2
    assert [f for f, _ in messages] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_one_worker_is_the_plain_loop_in_the_calling_thread():
    names = []
    out = th.parallel_map(
        lambda k: names.append(threading.current_thread().name) or -k, [1, 2, 3], silent(), str, workers=1
    )
    assert out == [-1, -2, -3] and set(names) == {threading.current_thread().name}


def test_an_error_in_a_worker_reaches_the_caller_and_the_thread_count_is_restored(two_threads):
    def fn(k: int) -> int:
        if k == 3:
            raise ValueError("layer 3 is broken")
        return k

    with pytest.raises(ValueError, match="layer 3"):
        th.parallel_map(fn, range(6), silent(), str, workers=2)
    assert torch.get_num_threads() == 2


def test_cancel_stops_the_items_not_started(two_threads):
    started = []
    progress = Progress()

    def fn(k: int) -> int:
        started.append(k)
        if k == 0:
            progress.cancel()  # the user presses Cancel while the first items run
        time.sleep(0.05)
        return k

    with pytest.raises(Cancelled):
        th.parallel_map(fn, range(20), progress, str, workers=2)
    assert len(started) < 20
    assert torch.get_num_threads() == 2


def test_workers_run_under_the_callers_inference_mode(two_threads):
    with torch.inference_mode():
        flags = th.parallel_map(
            lambda _: torch.is_inference_mode_enabled(), range(4), silent(), str, workers=2
        )
    assert flags == [True] * 4
    flags = th.parallel_map(
        lambda _: (torch.is_inference_mode_enabled(), torch.is_grad_enabled()),
        range(4),
        silent(),
        str,
        workers=2,
    )
    assert flags == [(False, torch.is_grad_enabled())] * 4


def test_cpu_workers(two_threads):
    assert th.cpu_workers(torch.device("cpu"), 30, 1e9) == 2
    assert th.cpu_workers(torch.device("cpu"), 1, 1e9) == 1
    assert th.cpu_workers(torch.device("cpu"), 30, 1e3) == 1  # tiny layers: not worth a thread
    assert th.cpu_workers(torch.device("cpu"), 30, 0.5 * th.MIN_FLOPS_PER_ITEM) == 1
    assert th.cpu_workers(torch.device("cuda"), 30, 1e9) == 1
    assert (
        th.cpu_workers(torch.device("cpu"), 30, 1e9, bytes_per_item=th.MAX_PARALLEL_BYTES) == 1
    )  # memory bound
    assert th.cpu_workers(torch.device("cpu"), 30, 1e9, bytes_per_item=th.MAX_PARALLEL_BYTES / 2) == 2
    torch.set_num_threads(1)
    assert th.cpu_workers(torch.device("cpu"), 30, 1e9) == 1


class _Ctx:
    """What T3 and T4 read from a ToolContext: aligned rows (and T2's CKA for T3's matching)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        self.A, self.B = A, B

    def aligned(self, progress):
        return Aligned(self.A, self.B, torch.arange(self.A.shape[1]) // 10, "token")

    def cka(self, progress, include_embeddings):
        return cka_matrix(self.A[1:], self.B[1:])


@pytest.mark.parametrize("dy", [40, 24])
def test_t3_and_t4_side_by_side_equal_the_plain_loop(monkeypatch, two_threads, dy):
    """A planted rotation plus noise (equal widths) and a random map (unequal widths): the layers
    computed on two workers are the layers of the one-thread loop, number for number."""
    g = torch.Generator().manual_seed(3)
    L, n, d = 6, 400, 40
    X = torch.randn(L + 1, n, d, generator=g) * torch.linspace(0.1, 2.0, d)
    Y = X @ (
        torch.linalg.qr(torch.randn(d, dy, generator=g))[0] if dy == d else torch.randn(d, dy, generator=g)
    )
    Y = Y + 0.05 * torch.randn(L + 1, n, dy, generator=g)

    def run(parallel: bool):
        monkeypatch.setattr(th, "MIN_FLOPS_PER_ITEM", 0.0 if parallel else float("inf"))
        torch.set_num_threads(2 if parallel else 1)
        used = []

        def spy(fn, items, progress, message, workers):
            used.append(workers)
            return th.parallel_map(fn, items, progress, message, workers)

        monkeypatch.setattr(t3, "parallel_map", spy)
        monkeypatch.setattr(t4, "parallel_map", spy)
        out = (
            t3.compute_procrustes(_Ctx(X, Y), t3.ProcrustesParams(), silent()),
            t4.compute_bridge(_Ctx(X, Y), t4.BridgeParams(), silent()),
        )
        assert used == ([2, 2] if parallel else [1, 1])
        return out

    (p1, b1), (p2, b2) = run(False), run(True)
    assert p2.layers == p1.layers and p2.mean_alignment == p1.mean_alignment
    assert b2.cos_bridged == b1.cos_bridged and b2.cos_raw == b1.cos_raw
    assert b2.best_target_for_donor == b1.best_target_for_donor
    if dy == d:
        assert min(l["alignment"] for l in p1.layers) > 0.9  # the planted rotation is found either way
