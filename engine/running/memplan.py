"""The memory plan of a run (docs/methods.md, "Streaming and the memory plan").

Before any weight is read, :func:`plan_run` works out from the models' safetensors headers and
config.json alone what a run will read and hold:

* **whole**: both models in the run's dtype, plus the captured rows and the statistics;
* **stream**: the larger of the two models' parts outside the blocks plus one block, plus the
  workload's hidden states, plus the same rows and statistics.

``--stream auto`` (the default) holds the models whole when that fits the budget and streams them
when it does not; ``on`` always streams, ``off`` never does. On a GPU, an activation tool's pair that
fits across the GPU and the host is placed by accelerate instead (``dispatch``:
:mod:`engine.running.dispatch_plan`), which ``--stream dispatch`` asks for anywhere. The budget is
``--max-memory`` or, when that is empty, 85% of the memory available now (the CUDA device's free
memory when the run is on one). A run that fits neither way is refused in one line that gives the numbers.

The plan also says what the run costs: bytes read, peak memory, and an estimated time from the
forward passes' multiply-adds at a rate measured once per process by a small matrix product in the
run's dtype (reading at an assumed :data:`READ_BYTES_PER_S`). It is an estimate, labelled so.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

import torch

from ..core.errors import GraftError
from .footprint import Footprint, footprint

GIB = 1024**3
DEFAULT_SHARE = 0.85  # of the memory available now, when --max-memory is empty
RUNTIME_BYTES = int(0.6 * GIB)  # Python, torch and transformers themselves (measured RSS ~0.5 GiB)
READ_BYTES_PER_S = 1.0e9  # assumed read rate of the weights, for the time estimate
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> Optional[int]:
    """``"8GiB"``, ``"8 GB"``, ``"8g"``, ``"512MiB"``, ``"1.5TB"`` -> bytes; empty -> None. Binary
    units (GiB) are powers of 1024, decimal ones (GB) powers of 1000, a bare letter is binary."""
    if text is None or not str(text).strip():
        return None
    m = _SIZE.match(str(text))
    if not m:
        raise GraftError(f"--max-memory {text!r} is not a size: write it like 8GiB, 512MiB or 16GB")
    value, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    power = "kmgt".index(unit) + 1 if unit else 0
    base = 1000 if suffix == "b" and unit else 1024
    n = int(value * base**power)
    if n < 64 * 1024**2:
        raise GraftError(f"--max-memory {text!r} is under 64 MiB: no model runs in that")
    return n


def available_bytes(device: torch.device) -> int:
    """Memory available now: the CUDA device's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 8 * GIB


def fmt_bytes(n: float) -> str:
    if n >= GIB / 10:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 1024**2:.0f} MiB" if n >= 1024**2 else f"{n / 1024:.0f} KiB"


@dataclass
class MemoryPlan:
    route: str  # "whole" | "stream" | "dispatch"
    budget_bytes: int
    peak_bytes: int
    read_bytes: int
    est_seconds: float
    tokens: int
    fits: bool
    whole_peak_bytes: int
    stream_peak_bytes: int
    models: list[dict[str, Any]] = field(default_factory=list)
    # T3 needs more fit rows than the wider model's width for a determined (unique) map
    t3_tokens_needed: int = 0
    t3_needed_peak_bytes: int = 0
    t3_needed_seconds: float = 0.0
    # how T2 and T3 keep their rows: "rows" (every layer's, in memory) or "streamed" (lean route)
    stats: str = "rows"
    lean_peak_bytes: int = 0
    # the dispatch route: what accelerate is given per model, and the host's peak beside the GPU's
    placement: list[dict[str, Any]] = field(default_factory=list)
    host_peak_bytes: int = 0
    lines: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@lru_cache(maxsize=8)
def flops_per_second(dtype: str, device: str) -> float:
    """Multiply-add rate of this machine in ``dtype``, from a small linear layer's product (timed
    once). It is ``F.linear``, the kernel the models' layers run: on a CPU a bare bfloat16 ``a @ b``
    can take another, much slower path (1 against 19 GFLOP/s on the measurement box)."""
    from ..loading.models import resolve_dtype

    dt = resolve_dtype(dtype)
    dev = torch.device(device)
    a = torch.randn(256, 1024, dtype=dt, device=dev)
    w = torch.randn(1024, 1024, dtype=dt, device=dev)
    best = float("inf")
    for _ in range(4):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, w).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * 256 * 1024 * 1024 / max(best, 1e-6)


def _rows_bytes(fp: Footprint, tokens: int) -> int:
    return (fp.n_layers + 1) * tokens * fp.width * 4  # captured float32 rows of every layer


def _stats_bytes(fps: list[Footprint], tokens: int) -> int:
    """The statistics T2-T4 build from the rows: an outlier-free copy of the rows, their centred
    float32 copy (CKA), CKA's bounded Gram blocks, T3's float64 d x d products on two workers."""
    rows = sum(_rows_bytes(f, tokens) for f in fps)
    dmax = max(f.width for f in fps)
    dsum = sum(f.width for f in fps)
    t3 = 2 * 16 * (tokens * dsum + 4 * dmax * dmax)
    return 2 * rows + int(5e8) + t3


def _hidden_bytes(fp: Footprint, tokens: int, dtype_size: int) -> int:
    """A streamed pass's working set beside the block: every batch's hidden states, and one batch's
    MLP intermediate activations (a batch of up to 8 texts of up to 512 tokens)."""
    batch = min(tokens, 8 * 512)
    return tokens * fp.width * dtype_size * 3 + batch * fp.intermediate * 4 * 3


def _evaluation_bytes(fps: list[Footprint], size: int) -> int:
    """An edit's evaluation on the streamed route: T, D and T' open at once, each with its embeddings
    and LM head, one block, a batch's logits (16 texts of 256 tokens, float32, with their
    log-softmax), and the weight being written."""
    big = max(fps, key=lambda f: f.outside_bytes)
    vocab = big.outside_bytes // max(1, size * big.width)
    logits = 2 * 16 * 256 * vocab * 4
    return 3 * 2 * big.outside_bytes + max(f.block_bytes for f in fps) * 2 + logits


def _lean_bytes(fps: list[Footprint], tokens: int, size: int) -> int:
    """Peak of the lean route (engine/running/lean_stats.py) beside the runtime: both walkers'
    hidden states and blocks (T3 reads the two models in step) after the larger embeddings were
    read, the minibatch Gram matrices of every layer, one layer pair's rows with T3's float64
    copies and d x d factors, and one layer's rows as T2 reads, aligns and centres them."""
    from ..measure.cka import MINIBATCH_ROWS

    b = min(MINIBATCH_ROWS, max(tokens, 1))
    grams = sum((f.n_layers + 1) * tokens * b * 4 for f in fps)
    dmax = max(f.width for f in fps)
    dsum = sum(f.width for f in fps)
    pair = 2 * tokens * dsum * 4 + 16 * (tokens * dsum + 4 * dmax * dmax) + tokens * b * 8
    layer = 20 * tokens * dmax  # a layer's rows as read, aligned, and centred in float64 (T2's Grams)
    walk = max(f.outside_bytes for f in fps) + sum(
        f.block_bytes + _hidden_bytes(f, tokens, size) for f in fps
    )
    return walk + grams + pair + layer


def plan_run(
    specs: list[Any],
    *,
    dtype: str,
    device: torch.device,
    tokens: int,
    max_memory: str = "",
    stream: str = "auto",
    streams: bool = True,
    activations: bool = True,
    heldout_fraction: float = 0.25,
    edits: bool = False,
    module_rows: bool = False,
    lean: bool = False,
    stats: str = "rows",
    dispatches: bool = False,
) -> MemoryPlan:
    """The plan of a run on ``specs`` (model specs, in the order the run loads them)."""
    from ..loading.models import resolve_dtype

    budget = parse_bytes(max_memory)
    if budget is None:
        budget = int(DEFAULT_SHARE * available_bytes(device))
    fps = [footprint(s, dtype) for s in specs]
    size = torch.empty(0, dtype=resolve_dtype(dtype)).element_size()

    def work_of(n_tok: int) -> int:
        work = _stats_bytes(fps, n_tok) if activations else 0
        if module_rows:  # every linear module's output rows, float32, kept then compared pairwise
            work += 2 * sum(f.module_width * n_tok * 4 for f in fps)
        return work

    def peaks(n_tok: int) -> tuple[int, int]:
        work = work_of(n_tok)
        whole = RUNTIME_BYTES + sum(f.run_bytes for f in fps) + work
        streamed = RUNTIME_BYTES + max(
            f.outside_bytes + f.block_bytes + _hidden_bytes(f, n_tok, size) for f in fps
        )
        if edits:  # T' staged as a folder and evaluated by whole passes (engine/running/stream_surgery.py)
            streamed = max(streamed, RUNTIME_BYTES + _evaluation_bytes(fps, size))
        return whole, streamed + work

    whole_peak, stream_peak = peaks(tokens)
    can_stream = streams and all(f.folder is not None for f in fps)
    if stream == "off":
        route = "whole"
    elif stream == "on":
        route = "stream"
    elif stats == "streamed" and lean and can_stream:
        route = "stream"  # the lean route reads the models block by block
    else:
        route = "whole" if whole_peak <= budget or not can_stream else "stream"
    lay = None
    if stream == "dispatch" and not can_stream:
        raise GraftError(
            "accelerate places model folders that Graft can build without their own code: a model built "
            "in memory, or one that needs its own code, is held whole (--stream off)"
        )
    # on a GPU a pair that does not fit it whole may fit across it and the host (not with --stats streamed)
    on_gpu = (stream, route, device.type) == ("auto", "stream", "cuda") and stats != "streamed"
    if dispatches and can_stream and (stream == "dispatch" or on_gpu):
        from .dispatch_plan import layout

        host = int(DEFAULT_SHARE * available_bytes(torch.device("cpu")))
        hidden = [_hidden_bytes(f, tokens, size) for f in fps]
        lay = layout(
            fps,
            device,
            budget=budget,
            host_budget=host,
            runtime=RUNTIME_BYTES,
            host_work=work_of(tokens),
            hidden=hidden,
        )
        if stream == "dispatch" or (
            lay.disk_bytes == 0 and lay.device_peak <= budget and lay.host_peak <= host
        ):
            route = "dispatch"
    peak = whole_peak if route == "whole" else stream_peak
    if route == "dispatch":
        peak = lay.device_peak
    lean_peak = (
        RUNTIME_BYTES + _lean_bytes(fps, tokens, size) if lean and activations and len(fps) >= 2 else 0
    )
    use_lean = (
        lean_peak > 0
        and route == "stream"
        and (stats == "streamed" or (stats == "auto" and stream_peak > budget and lean_peak < stream_peak))
    )
    if use_lean:
        peak = lean_peak
    rate = flops_per_second(dtype, str(device))
    read = sum(f.file_bytes for f in fps)

    def seconds(n_tok: int) -> float:
        compute = sum(2 * f.backbone_params * n_tok for f in fps) / rate if activations else 0.0
        return compute + read / READ_BYTES_PER_S

    est = seconds(tokens)
    wide = max(f.width for f in fps) if fps else 0
    need = int((wide + 2) / max(1e-6, 1 - heldout_fraction)) + 1 if activations and len(fps) >= 2 else 0
    need_w, need_s = peaks(need) if need else (0, 0)
    plan = MemoryPlan(
        route=route,
        budget_bytes=budget,
        peak_bytes=peak,
        read_bytes=read,
        est_seconds=round(est, 1),
        tokens=tokens,
        fits=peak <= budget,
        whole_peak_bytes=whole_peak,
        stream_peak_bytes=stream_peak,
        models=[
            {
                "label": f.label,
                "weights_bytes": f.file_bytes,
                "in_run_dtype_bytes": f.run_bytes,
                "largest_block_bytes": f.block_bytes,
                "layers": f.n_layers,
                "width": f.width,
                "streams": f.folder is not None,
            }
            for f in fps
        ],
        t3_tokens_needed=need,
        t3_needed_peak_bytes=(need_w if route == "whole" else need_s) if need else 0,
        t3_needed_seconds=round(seconds(need), 1) if need else 0.0,
        stats="streamed" if use_lean else "rows",
        lean_peak_bytes=lean_peak,
        placement=lay.models if route == "dispatch" else [],
        host_peak_bytes=lay.host_peak if route == "dispatch" else 0,
    )
    if route == "dispatch" and device.type == "cuda" and lay.host_peak > host:
        plan.fits = False
    if need and lean_peak and route == "stream":  # a determined T3 on the cheaper of the two routes
        need_lean = RUNTIME_BYTES + _lean_bytes(fps, need, size)
        if need_lean < plan.t3_needed_peak_bytes:
            plan.t3_needed_peak_bytes = need_lean
    held = {"whole": "held whole", "stream": "streamed block by block"}.get(route, "")
    if route == "dispatch":
        tiers = [(t, sum(m[f"{t}_bytes"] for m in lay.models)) for t in ("device", "cpu", "disk")]
        held = "placed by accelerate: " + ", ".join(f"{fmt_bytes(b)} on {t}" for t, b in tiers if b)
        if device.type == "cuda":
            held += f" (host peak about {fmt_bytes(lay.host_peak)})"
    if use_lean:
        held += " (T2/T3 keep no rows: --stats streamed)"
    plan.lines.append(
        f"{held}: reads {fmt_bytes(read)}, peak about {fmt_bytes(peak)} of a {fmt_bytes(budget)} budget, "
        f"about {duration(est)} (estimated)"
    )
    if need:
        plan.lines.append(
            f"a determined T3 needs about {need:,} tokens (width {wide:,}): about "
            f"{fmt_bytes(plan.t3_needed_peak_bytes)} peak and {duration(plan.t3_needed_seconds)}"
        )
    return plan


def duration(s: float) -> str:
    if s < 1:
        return "under 1 s"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def refusal(plan: MemoryPlan, streams: bool) -> Optional[str]:
    """The one line that refuses a plan that does not fit; None when it fits. ``streams``: the
    tool can run on streamed models."""
    if plan.fits:
        return None
    can_stream = all(m["streams"] for m in plan.models)
    need = fmt_bytes(plan.peak_bytes)
    if plan.route == "dispatch":
        return (
            f"placed by accelerate the run needs about {need} where it runs and "
            f"{fmt_bytes(plan.host_peak_bytes or plan.peak_bytes)} on the host, over the "
            f"{fmt_bytes(plan.budget_bytes)} budget or the host's memory: lower --max-tokens, raise "
            "--max-memory, or stream the models block by block (--stream on)"
        )
    if plan.route == "whole" and streams and can_stream:
        return (
            f"the pair needs about {need} held whole, over the {fmt_bytes(plan.budget_bytes)} budget: "
            f"stream it (--stream auto or on; about {fmt_bytes(plan.stream_peak_bytes)}) "
            "or raise --max-memory"
        )
    if plan.route == "whole":
        why = "this tool reads the models whole" if not streams else "a model built in memory cannot stream"
        return (
            f"the pair needs about {need} held whole, over the {fmt_bytes(plan.budget_bytes)} budget, and "
            f"{why}: raise --max-memory or use smaller models"
        )
    lean = ""
    if plan.stats == "rows" and 0 < plan.lean_peak_bytes <= plan.budget_bytes:
        lean = f", or keep no rows with --stats streamed (about {fmt_bytes(plan.lean_peak_bytes)})"
    return (
        f"even streamed block by block the run needs about {need}, over the "
        f"{fmt_bytes(plan.budget_bytes)} budget: lower --max-tokens or raise --max-memory{lean}"
    )
