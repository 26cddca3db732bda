"""Independent per-layer linear algebra spread over a CPU's cores, one torch thread per worker.

T3's per-layer fits (an SVD each) and T4's per-position bridges are independent. A LAPACK SVD of
576 x 576 barely speeds up with more threads (80 ms on one thread of this machine, 54-81 ms on
two), so with several cores the layers go faster side by side than one after another with every
core on each. :func:`parallel_map` runs them on ``torch.get_num_threads()`` worker threads, each
with one torch thread, so the process never has more busy threads than it was given; with one
thread (or little work) it is the plain loop. Only for the CPU: CUDA work is queued on one stream
anyway.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Sequence, TypeVar

import torch

from .progress import Progress

T = TypeVar("T")
R = TypeVar("R")

# Below this many flops per item the loop stays sequential, torch's own threads on each item: a
# worker's single-threaded product of 1e9 flops takes about 11 ms here, and below that the
# hand-off costs more than it saves (the tiny models' T4, 4 positions of 1.8e8 flops each: 17 ms
# on two workers, 11 ms in the loop).
MIN_FLOPS_PER_ITEM = 1e9

# Every worker holds one item's working copies at a time: on a many-core host the workers are
# capped so that all of them together stay under this many bytes.
MAX_PARALLEL_BYTES = 2 * 2**30

# torch's thread count is process-wide state; one parallel section at a time sets and restores it.
_SECTION = threading.Lock()


def cpu_workers(
    device: torch.device, n_items: int, flops_per_item: float, bytes_per_item: float = 0.0
) -> int:
    """How many workers :func:`parallel_map` should use: torch's CPU thread count, at most one per
    item and as many as ``MAX_PARALLEL_BYTES`` holds; 1 on CUDA or when an item is too small to
    be worth a thread."""
    if device.type != "cpu" or flops_per_item < MIN_FLOPS_PER_ITEM:
        return 1
    by_memory = int(MAX_PARALLEL_BYTES // bytes_per_item) if bytes_per_item > 0 else n_items
    return max(1, min(torch.get_num_threads(), n_items, by_memory))


def parallel_map(
    fn: Callable[[T], R], items: Sequence[T], progress: Progress, message: Callable[[T], str], workers: int
) -> list[R]:
    """``[fn(item) for item in items]``, on ``workers`` threads when more than 1.

    Each worker runs torch single-threaded, under the caller's grad and inference modes (both are
    per-thread in torch). Progress is reported from the calling thread as items finish, so the
    caller's cancellation points hold: a cancel stops the items not started, waits for the running
    ones (one per worker) and raises. torch's thread count is restored on the way out.
    """
    items = list(items)
    n = len(items)
    if workers <= 1 or n <= 1:
        out = []
        for k, item in enumerate(items):
            progress(k / max(n, 1), message(item))
            out.append(fn(item))
        return out
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(item: T) -> R:
        torch.set_num_threads(1)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(item)

    results: list = [None] * n
    with _SECTION:
        threads = torch.get_num_threads()
        pool = ThreadPoolExecutor(max_workers=min(workers, n), thread_name_prefix="graft-linalg")
        try:
            futures = {pool.submit(run, item): k for k, item in enumerate(items)}
            for done, future in enumerate(as_completed(futures), start=1):
                k = futures[future]
                results[k] = future.result()
                progress(done / n, message(items[k]))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads)
    return results
