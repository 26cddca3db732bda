"""The dispatch route of the memory plan (docs/methods.md, "Streaming and the memory plan").

On a GPU, a pair that does not fit the device whole but fits across the device and the host is
placed by accelerate (``device_map="auto"`` with a ``max_memory`` map per model:
:mod:`engine.loading.dispatch`); a pair that does not fit even there streams block by block.
:func:`layout` splits the budgets between the two models in proportion to their sizes and says what
lands where. On a CPU (``--stream dispatch`` asked for) the host is the first tier and disk the next.

What the estimate counts, beside each model's weights in the run's dtype:

* on the execution device: the workload's hidden states and one batch's MLP activations per model
  (as a streamed pass holds), and the largest block, which an offloaded block occupies while it runs;
* on the host: the runtime, the captured rows and the statistics built from them.

accelerate reserves room for its largest layer on the main device itself, so its placement can keep
a little less on the device than this estimate; the run records the placement it made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Layout:
    device_peak: int  # the execution device (the host itself on a CPU run)
    host_peak: int
    disk_bytes: int
    models: list[dict[str, Any]] = field(default_factory=list)


def layout(
    fps: list[Any],
    device: torch.device,
    *,
    budget: int,
    host_budget: int,
    runtime: int,
    host_work: int,
    hidden: list[int],
) -> Layout:
    """Place ``fps`` (memory-plan footprints): ``budget`` is the device's (the host's on a CPU run),
    ``host_work`` what the run keeps on the host besides weights, ``hidden`` each model's working
    set beside its block. Shares are in proportion to each model's size in the run's dtype."""
    total = max(1, sum(f.run_bytes for f in fps))
    block = max(f.block_bytes for f in fps)
    gpu = device.type == "cuda"
    if gpu:
        dev_free = max(0, budget - max(hidden) - block)
        host_free = max(0, host_budget - runtime - host_work)
    else:
        dev_free = 0
        host_free = max(0, budget - runtime - host_work - max(hidden) - block)
    models = []
    on_dev = on_cpu = on_disk = 0
    for f in fps:
        share = f.run_bytes / total
        d_share, c_share = int(dev_free * share), int(host_free * share)
        d = min(f.run_bytes, d_share)
        c = min(f.run_bytes - d, c_share)
        k = f.run_bytes - d - c
        on_dev, on_cpu, on_disk = on_dev + d, on_cpu + c, on_disk + k
        max_memory = {"cpu": c_share}
        if gpu:
            max_memory = {f"cuda:{device.index or 0}": d_share, "cpu": c_share}
        models.append(
            {
                "label": f.label,
                "max_memory": max_memory,
                "device_bytes": d,
                "cpu_bytes": c,
                "disk_bytes": k,
            }
        )
    offloaded = block if on_cpu + on_disk else 0
    if gpu:
        device_peak = on_dev + max(hidden) + offloaded
        host_peak = runtime + host_work + on_cpu
    else:
        host_peak = runtime + host_work + on_cpu + max(hidden) + offloaded
        device_peak = host_peak
    return Layout(device_peak, host_peak, on_disk, models)
