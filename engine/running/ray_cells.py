"""The Ray route of :func:`engine.running.cells.run_cells` (imported only when ``--ray`` is set).

* **Where.** ``--ray auto`` starts a local Ray in this process on first use (it stays up for later
  runs); ``--ray host:port`` joins a running cluster. A cluster's workers import Graft and read
  the models from the same paths as here (the driver's ``sys.path`` is passed to them).
* **Workers.** One actor per slot: one CPU each on a CPU run (torch on one thread), or a share
  of a GPU: a whole one, or ``1/k`` when ``k`` copies of the models fit in its memory. Each
  actor loads the models once, from their specs (:class:`~engine.running.cells.Recipe`), and
  serves many cells, fed from one queue. At most as many actors as cells, and no more than the
  cluster's CPUs, GPUs and memory hold.
* **Failures.** A cell whose worker dies (killed, out of memory, a crash) goes back to the queue
  once, on a fresh worker; if that one dies too, the cell is reported failed and the rest go on.
  An error raised by the cell itself (a bad parameter, a model that does not load) is raised
  here, as it would be in process.
* **Cancel.** Every ``POLL_S`` the driver checks for a cancel; on a cancel it kills every actor
  (their processes stop at once) and raises ``Cancelled``.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from typing import Any, Optional

import ray  # noqa: I001  (only this module imports Ray)
import torch

from ..core.errors import GraftError
from ..core.progress import Progress, silent
from ..loading.models import ModelStore
from .cells import CellRun, Grid, Recipe, resolve_fn, worker_context

POLL_S = 0.2
THREADS_PER_WORKER = 1  # torch threads of a worker: one per CPU it holds (Ray gives it num_cpus=1)
ACTOR_MEMORY_FACTOR = 1.5  # a worker holds its models plus a working copy of what a cell changes


class CellWorker:
    """A Ray actor (wrapped by :func:`_actor_class`): the recipe's context, built once."""

    def __init__(self, recipe: Recipe, threads: int, fn: str) -> None:
        torch.set_num_threads(threads)
        self.error = ""
        self.ctx = None
        try:
            resolve_fn(fn)  # imports the cell function's module here: a failure is the first cell's error
            self.ctx = worker_context(recipe, ModelStore())
        except Exception as exc:  # said by the first cell, in one line, instead of a dead actor
            why = str(exc) if isinstance(exc, GraftError) else f"{type(exc).__name__}: {exc}"
            self.error = f"a Ray worker could not set up the run: {why}"

    def run(self, fn: str, shared: dict, cell: dict) -> dict:
        if self.ctx is None:
            raise GraftError(self.error)
        t0 = time.perf_counter()
        out = resolve_fn(fn)(self.ctx, shared, cell, silent())
        return {"result": out, "seconds": round(time.perf_counter() - t0, 4), "pid": os.getpid()}

    def finish(self, fn: str, shared: dict) -> dict:
        return {} if self.ctx is None else resolve_fn(fn)(self.ctx, shared)


_joined: Optional[str] = None  # the --ray value this process started or joined Ray for


def connect(address: str) -> str:
    """Start (``auto``) or join (``host:port``) Ray, once per process and value; the address in use.

    A Ray this process already runs for the same value is reused; another value shuts it down
    first. A Ray started by someone else in this process (a test, a notebook) is used as it is."""
    global _joined
    if ray.is_initialized() and _joined is not None and _joined != address:
        ray.shutdown()
        _joined = None
    if not ray.is_initialized():
        common: dict[str, Any] = dict(
            include_dashboard=False, log_to_driver=False, configure_logging=False, namespace="graft"
        )
        try:
            if address == "auto":
                ray.init(address="local", num_cpus=os.cpu_count() or 1, **common)
            else:
                ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise GraftError(f"--ray {address}: could not start or reach Ray ({why})") from None
        _joined = address
    return str(ray.get_runtime_context().gcs_address)


def plan_workers(recipe: Recipe, n_cells: int, model_bytes: int) -> tuple[int, dict[str, Any]]:
    """How many actors, and each actor's Ray resources (see the module doc)."""
    # The cluster's totals, not what is free this instant: the workers of a run that just ended
    # are still being killed, and a busy cluster queues ours until theirs are done.
    free = ray.cluster_resources()
    need = int(model_bytes * ACTOR_MEMORY_FACTOR)
    gpus = float(free.get("GPU", 0.0))
    on_gpu = gpus >= 1 and recipe.options.get("device") != "cpu"
    opts: dict[str, Any] = {"num_cpus": 1, "memory": max(need, 1)}
    if on_gpu:
        per_gpu = 1
        if torch.cuda.is_available() and need > 0:
            per_gpu = max(1, min(8, int(torch.cuda.get_device_properties(0).total_memory * 0.9 // need)))
        opts["num_gpus"] = 1.0 / per_gpu
        slots = int(gpus) * per_gpu
    elif recipe.options.get("device") == "cuda":
        raise GraftError("--device cuda with --ray: the Ray cluster has no GPU")
    else:
        slots = int(free.get("CPU", 0.0))
    if "memory" in free and need > 0:
        slots = min(slots, int(free["memory"] // need))
    if slots < 1:
        raise GraftError(
            f"--ray: the cluster has no room for one worker (it has {_resources(free)}; one worker needs "
            f"1 CPU and {need / 2**30:.2f} GiB)"
        )
    return min(slots, n_cells), opts


def _resources(free: dict[str, float]) -> str:
    parts = [f"{free.get('CPU', 0):g} CPU", f"{free.get('GPU', 0):g} GPU"]
    if "memory" in free:
        parts.append(f"{free['memory'] / 2**30:.1f} GiB")
    return ", ".join(parts)


def worker_env() -> dict[str, str]:
    """What a worker process needs from this one: its import path (Graft, and the module of a cell
    function) and GRAFT_HOME (the run history and caches)."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    if os.environ.get("GRAFT_HOME"):
        env["GRAFT_HOME"] = os.environ["GRAFT_HOME"]
    return env


def _actor_class(opts: dict[str, Any]) -> Any:
    return ray.remote(max_restarts=0, max_task_retries=0, runtime_env={"env_vars": worker_env()}, **opts)(
        CellWorker
    )


def run_on_ray(recipe: Recipe, grid: Grid, progress: Progress, address: str, model_bytes: int = 0) -> CellRun:
    """Run ``grid`` on Ray workers built from ``recipe`` (see the module doc)."""
    fn, shared, cells, label, finish = grid.fn, grid.shared, grid.cells, grid.label, grid.finish
    progress(0.0, f"starting Ray ({address})")
    where = connect(address)
    n = len(cells)
    n_workers, opts = plan_workers(recipe, n, model_bytes)
    actor_cls = _actor_class(opts)
    threads = THREADS_PER_WORKER
    workers = [actor_cls.remote(recipe, threads, fn) for _ in range(n_workers)]
    queue = collections.deque(range(n))
    attempts = [0] * n
    pending: dict[Any, tuple[int, int]] = {}  # ref -> (cell, worker slot)
    idle = list(range(n_workers))
    out = CellRun([None] * n)
    retried: list[str] = []
    seconds: list[Optional[float]] = [None] * n
    done = 0
    progress(0.0, f"{n} cells on {n_workers} Ray worker(s)")
    try:
        while queue or pending:
            progress.check()
            while idle and queue:
                slot, i = idle.pop(), queue.popleft()
                attempts[i] += 1
                pending[workers[slot].run.remote(fn, shared, cells[i])] = (i, slot)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            for ref in ready:
                i, slot = pending.pop(ref)
                try:
                    got = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    workers[slot] = actor_cls.remote(recipe, threads, fn)  # a fresh worker in its place
                    idle.append(slot)
                    why = str(exc).splitlines()[0]
                    if attempts[i] < 2:
                        retried.append(label(cells[i]))
                        queue.appendleft(i)
                        continue
                    out.failed[i] = f"{label(cells[i])}: its Ray worker died twice ({why})"
                except ray.exceptions.RayTaskError as exc:  # the cell's own error, as in process
                    cause = exc.cause if isinstance(exc.cause, Exception) else None
                    raise (cause or GraftError(str(exc).splitlines()[-1])) from None
                except ray.exceptions.RayError as exc:  # Ray itself (a worker's environment, the cluster)
                    why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                    raise GraftError(f"--ray {address}: {why}") from None
                else:
                    out.results[i], seconds[i] = got["result"], got["seconds"]
                    idle.append(slot)
                done += 1
                how = "failed" if i in out.failed else "done"
                progress(done / n, f"{label(cells[i])}: {how} ({done}/{n} cells)")
        if finish is not None:
            for ref in [w.finish.remote(finish, shared) for w in workers]:
                try:
                    out.finish.append(ray.get(ref))
                except ray.exceptions.RayActorError as exc:
                    why = str(exc).splitlines()[0]
                    out.finish.append({"lost": f"a worker died before its final check ({why})"})
    finally:
        for w in workers:  # a worker holds its models: none outlives the run (or its cancel)
            ray.kill(w, no_restart=True)
    out.meta = {
        "address": where,
        "workers": n_workers,
        "threads_per_worker": threads,
        "num_gpus_per_worker": opts.get("num_gpus", 0.0),
        "cells": n,
        "retried": retried,
        "failed": [out.failed[i] for i in sorted(out.failed)],
        "cell_seconds": seconds,
    }
    return out
