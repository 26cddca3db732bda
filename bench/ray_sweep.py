"""Sweeps in process and on a local Ray: the time of each, Ray's overhead, and equal results.

On the demo pair (the concept-tuned SmolLM2 donor, SmolLM2 target), two sweeps run through
``run_tool``, the path the CLI and the app take:

* **T9** (``position-sweep``): the demo organ (``organ-extract`` from the demo donor: k = 3 blocks
  from s = floor(L/3)) inserted direct at each of ``--positions``, each position a cell;
* **T8** (``sweep-k``): the top K modules swapped for each K of ``--k-grid``, each K > 0 a cell.

Each sweep runs three times in this one process, on the same warm models:

1. in process with every thread of the machine (the default path);
2. in process on one thread (the Ray workers' setting: the bit-for-bit reference);
3. with ``--ray auto``: a local Ray on all CPUs, one single-threaded worker per CPU, while this
   process does the sweep's own part (T8's ranking, the evaluations of T and D) on every thread;
   every run pays the workers' start and model loads (``ray_start_s`` is Ray's own start, timed
   apart before the sweeps).

Reported: wall seconds of each, ``overhead_s`` = Ray wall - in-process wall (all threads), the
sum of the cells' own seconds on the workers, and whether the Ray result equals run 2 and run 1
to the bit. Usage::

    python bench/ray_sweep.py [--positions 1,4,7,10,14,17,20,24] [--k-grid 0,1,4,16,64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.api import DEMO_DONOR, SMOLLM2, ModelSpec, run_tool  # noqa: E402
from engine.evaluation.evalcache import clear_cache  # noqa: E402
from engine.loading.models import ModelStore  # noqa: E402
from engine.measure.capture_cache import CaptureCache  # noqa: E402


def timed(fn: Any) -> tuple[dict[str, Any], float]:
    """``fn()`` and its wall seconds, from cold caches: every run measures every state itself."""
    clear_cache()
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 2)


def runner(store: ModelStore, opts: dict[str, Any], **kw: Any) -> Any:
    """A run of the tool ``name`` with extra options (``{"ray": "auto"}``), cold caches each time."""

    def run(name: str, extra: dict[str, Any]) -> dict[str, Any]:
        return run_tool(name, store=store, captures=CaptureCache(), options={**opts, **extra}, **kw)

    return run


def sweep(name: str, run: Any, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    here, t_all = timed(lambda: run(name, {}))
    torch.set_num_threads(1)
    one, t_one = timed(lambda: run(name, {}))
    torch.set_num_threads(threads)  # the driver's own part (ranking, T and D) as in process
    there, t_ray = timed(lambda: run(name, {"ray": "auto"}))
    meta = there["meta"]["ray"]
    return {
        "tool": name,
        "cells": meta["cells"],
        "workers": meta["workers"],
        "in_process_s": t_all,
        "in_process_one_thread_s": t_one,
        "ray_s": t_ray,
        "overhead_s": round(t_ray - t_all, 2),
        "cells_on_workers_s": round(sum(s for s in meta["cell_seconds"] if s is not None), 2),
        "equal_to_one_thread": there["result"] == one["result"],
        "equal_to_all_threads": there["result"] == here["result"],
        "retried": meta["retried"],
        "failed": meta["failed"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", default="1,4,7,10,14,17,20,24")
    ap.add_argument("--k-grid", default="0,1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    store = ModelStore()
    donor, target = ModelSpec.parse(DEMO_DONOR), ModelSpec.parse(SMOLLM2)
    opts = {"max_tokens": args.max_tokens, "device": "cpu"}

    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start = round(time.perf_counter() - t0, 2)

    with tempfile.TemporaryDirectory() as tmp:
        organ = run_tool(
            "organ-extract", donor=donor, store=store, options=opts, params={"out": str(Path(tmp) / "organ")}
        )["result"]["path"]
        t9_params = {"positions": args.positions, "strategy": "direct", "epsilon": False}
        t9_run = runner(store, opts, target=target, organ=organ, params=t9_params)
        t9 = sweep("position-sweep", t9_run, threads)
    t8_run = runner(store, opts, donor=donor, target=target, params={"k_grid": args.k_grid})
    t8 = sweep("sweep-k", t8_run, threads)
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "versions": {"torch": torch.__version__, "ray": ray.__version__},
        "threads_in_process": threads,
        "ray_start_s": ray_start,
        "date": time.strftime("%Y-%m-%d"),
        "positions": args.positions,
        "k_grid": args.k_grid,
        "sweeps": [t9, t8],
    }
    print(json.dumps(out, indent=2))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
