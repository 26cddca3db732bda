"""Cost of the pre-surgery diagnostics, as ratios taken within one run, and how it grows.

For each pair and token budget: ratio = (activation capture + T1 + T2 + T3 + T4) / (bare forward
passes of both models over the same budgeted texts, batched as the capture batches them: texts
of like length together; no hooks), medians of
``--repeat`` runs. The capture runs each model's backbone only (no LM head: no logits are needed),
so ``ratio_backbone`` also divides by bare passes of the backbones, the floor a capture could reach.
T2's time is split into the capture (``capture_s``: the forward passes with hooks), the row
alignment with its outlier filter (``align_s``) and CKA itself (``cka_s``). Also the peak process memory
(RSS; each pair and budget runs in its own
process so the peaks do not mix) and, on CUDA, the peak GPU memory. Usage:

    python bench/alignment.py [--pairs tiny,smollm2,gemma] [--budgets 512,2048,8192] [--workload scale]
                              [--device auto] [--dtype float32] [--repeat 3] [--threads 0] [--in-order]
                              [--json out.json]

``--in-order`` also times the bare passes batched in workload order (``bare_in_order_s``,
``ratio_in_order``): how this bench batched them before the capture sorted its texts by length.

``--threads`` is torch's intra-op thread count (default 0: torch's default, every core, as the app
runs and as the tables in docs/measurements.md were taken; 1 for the one-thread figures). With more than one
thread on a CPU, T3's layers and T4's positions run side by side (``engine/core/threads.py``). The JSON also
lists every repeat (``bare_forward_runs_s``,
``diagnostics_runs_s``): with several threads the bare passes vary between repeats.

Workloads: ``concept`` is the bundled concept set (what the app runs by default; it holds about
1,460 SmolLM2 tokens, so larger budgets stop there); ``scale`` (default) is every text of
``data/*.jsonl`` followed by the paragraphs of README.md, about 12,000 tokens, so the budgets of
512, 2,048 and 8,192 tokens are really reached; or a workload file.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine.tools  # noqa: E402, F401  (registers every tool: the registry never imports them)
from engine.core.data import (
    load_workload,  # noqa: E402
    resolve_workload,  # noqa: E402
)
from engine.loading.builtins import DEMO_DONOR, GEMMA3, SMOLLM2, builtin_folder
from engine.loading.models import ModelSpec, ModelStore
from engine.measure.budget import MAX_TOKENS_PER_TEXT, budget_texts, length_batches  # noqa: E402
from engine.measure.capture import backbone  # noqa: E402
from engine.measure.capture_cache import CaptureCache  # noqa: E402
from engine.running.runner import run_tool  # noqa: E402

PAIRS = {
    "tiny": ("tiny-gpt2-a", "tiny-gpt2-b"),
    "tiny-cross": ("tiny-gpt2-a", "tiny-llama-b"),
    "smollm2": (DEMO_DONOR, SMOLLM2),
    "gemma": (SMOLLM2, GEMMA3),
}
TOOLS = ("compat", "cka", "procrustes", "bridge-check")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


SCALE_README_COMMIT = "6200279"  # README.md as of this commit, so the workload does not drift with the README


def scale_workload() -> str:
    """A plain-text workload (one text per line) large enough for 8,192 tokens: the texts of
    data/*.jsonl, then README.md's paragraphs (blank-line separated, whitespace collapsed) as of
    SCALE_README_COMMIT (the current README when git cannot show it)."""
    texts = []
    for name in ("concept_set", "retained", "replay"):
        texts.extend(load_workload(str(ROOT / "data" / f"{name}.jsonl")).texts)
    git = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{SCALE_README_COMMIT}:README.md"], capture_output=True, text=True
    )
    readme = git.stdout if git.returncode == 0 else (ROOT / "README.md").read_text()
    for para in re.split(r"\n\s*\n", readme):
        para = " ".join(para.split())
        if len(para) >= 40:
            texts.append(para)
    f = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    f.write("\n".join(texts) + "\n")
    f.close()
    return f.name


def workload_path(name: str) -> str:
    """'scale', 'concept' (the bundled concept set: '') or a workload file."""
    return scale_workload() if name == "scale" else "" if name == "concept" else name


@torch.inference_mode()
def bare_forward(model, texts, batch_size, net=None, by_length: bool = True) -> float:
    """Seconds of plain forward passes (no hooks) of the whole model, logits included, or of
    ``net`` (the backbone a capture runs, :func:`engine.measure.capture.backbone`). Batched as the capture
    batches (texts of like length together, :func:`engine.measure.budget.length_batches`), or with
    ``by_length=False`` in workload order, as this bench did before the capture sorted."""
    tok = model.tokenizer
    net = net if net is not None else model.model
    tok.padding_side = "right"
    t0 = time.perf_counter()
    ids = tok(list(texts), truncation=True, max_length=MAX_TOKENS_PER_TEXT)["input_ids"]
    batches = (
        length_batches([len(x) for x in ids], batch_size)
        if by_length
        else [list(range(b, min(b + batch_size, len(ids)))) for b in range(0, len(ids), batch_size)]
    )
    for idx in batches:
        enc = tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
        net(
            input_ids=enc["input_ids"].to(model.device),
            attention_mask=enc["attention_mask"].to(model.device),
            use_cache=False,
        )
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_pair(name: str, donor: str, target: str, max_tokens: int, args) -> dict:
    store = ModelStore()
    opts = {
        "max_tokens": max_tokens,
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "workload": args.workload,
    }
    d = store.get(ModelSpec.parse(donor), args.device, args.dtype)
    t = store.get(ModelSpec.parse(target), args.device, args.dtype)
    texts = budget_texts(resolve_workload(args.workload).texts, [d.tokenizer, t.tokenizer], max_tokens)
    bare_forward(d, texts[:2], args.batch_size)  # warm-up (allocator, kernels)
    bare_forward(t, texts[:2], args.batch_size)
    for tool in TOOLS:  # and the diagnostics' first calls (one-time costs: a first GPU run was 4x the next)
        run_tool(tool, d, t, {**opts, "max_tokens": 256}, captures=CaptureCache())
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bare, base, diag, per_tool, capture, in_order = [], [], [], {k: [] for k in TOOLS}, [], []
    shared = {"align_seconds": [], "cka_seconds": []}  # per repeat, summed over its tools
    n_rows = 0
    for _ in range(args.repeat):
        bare.append(bare_forward(d, texts, args.batch_size) + bare_forward(t, texts, args.batch_size))
        base.append(
            bare_forward(d, texts, args.batch_size, backbone(d))
            + bare_forward(t, texts, args.batch_size, backbone(t))
        )
        if args.in_order:
            in_order.append(
                bare_forward(d, texts, args.batch_size, by_length=False)
                + bare_forward(t, texts, args.batch_size, by_length=False)
            )
        cache = CaptureCache()  # fresh: the capture is part of what we time
        t0 = time.perf_counter()
        cap = 0.0
        parts = {k: 0.0 for k in shared}
        for tool in TOOLS:
            t1 = time.perf_counter()
            env = run_tool(tool, d, t, opts, captures=cache)
            per_tool[tool].append(time.perf_counter() - t1)
            n_rows = env["meta"].get("n_rows", n_rows)
            cap += env["meta"].get("capture_seconds", 0.0)  # the forward passes with hooks (0 once cached)
            for k in parts:
                parts[k] += env["meta"].get(k, 0.0)
        diag.append(time.perf_counter() - t0)
        capture.append(cap)
        for k, v in parts.items():
            shared[k].append(v)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    out = {
        "pair": name,
        "donor": donor,
        "target": target,
        "device": str(d.device),
        "dtype": args.dtype,
        "n_texts": len(texts),
        "max_tokens": max_tokens,
        "n_rows": n_rows,
        "repeat": args.repeat,
        "bare_forward_s": round(med(bare), 4),
        "diagnostics_s": round(med(diag), 4),
        "backbone_forward_s": round(med(base), 4),
        "ratio": round(med(diag) / med(bare), 3),
        "ratio_backbone": round(med(diag) / med(base), 3),
        "per_tool_s": {k: round(med(v), 4) for k, v in per_tool.items()},
        "capture_s": round(med(capture), 4),  # part of the first tool that captures (cka)
        # also parts of T2's time: the token alignment with its outlier filter, and CKA itself
        "align_s": round(med(shared["align_seconds"]), 4),
        "cka_s": round(med(shared["cka_seconds"]), 4),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        # every repeat, in order, so the spread behind the medians can be read
        "bare_forward_runs_s": [round(x, 4) for x in bare],
        "diagnostics_runs_s": [round(x, 4) for x in diag],
    }
    if in_order:  # the bare passes as this bench ran them before the capture batched by length
        out["bare_in_order_s"] = round(med(in_order), 4)
        out["ratio_in_order"] = round(med(diag) / med(in_order), 3)
        out["bare_in_order_runs_s"] = [round(x, 4) for x in in_order]
    if d.device.type == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def line(r: dict) -> str:
    return (
        f"{r['pair']:8s} {r['max_tokens']:5d} tok rows={r['n_rows']:5d} {r['device']:4s} "
        f"bare={r['bare_forward_s']:.3f}s "
        f"backbone={r['backbone_forward_s']:.3f}s diagnostics={r['diagnostics_s']:.3f}s "
        f"ratio={r['ratio']:.2f} "
        f"(÷backbone {r['ratio_backbone']:.2f}) peak_rss={r['peak_rss_mib']:.0f}MiB "
        + (f"peak_gpu={r['peak_gpu_mib']:.0f}MiB " if "peak_gpu_mib" in r else "")
        + " ".join(f"{k}={v:.3f}s" for k, v in r["per_tool_s"].items())
        + (
            f" in-order bare={r['bare_in_order_s']:.3f}s ratio_in_order={r['ratio_in_order']:.2f} "
            if "bare_in_order_s" in r
            else ""
        )
        + (f" (capture {r['capture_s']:.3f}s" if "capture_s" in r else "")
        + (
            f", align {r['align_s']:.3f}s, CKA {r['cka_s']:.3f}s)"
            if "cka_s" in r
            else ")"
            if "capture_s" in r
            else ""
        )
    )


PAIR_NAMES = {
    "tiny": "tiny-gpt2-a vs tiny-gpt2-b",
    "tiny-cross": "tiny-gpt2-a vs tiny-llama-b",
    "smollm2": "demo donor vs SmolLM2-135M",
    "gemma": "SmolLM2-135M vs Gemma-3-270M",
}


def machine() -> str:
    """This machine in one line: cores, memory, CPU model, torch and device."""
    import os
    import platform

    mem = next((ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), "0")
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), ""
    )
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{os.cpu_count()} cores ({cpu or platform.processor()}), {int(mem) / 2**20:.0f} GiB{gpu}; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    """The table of docs/measurements.md, with the machine, the settings and the date it was taken."""
    from datetime import datetime, timezone

    def s(x: float) -> str:
        return f"{x:.3f} s" if x < 0.1 else f"{x:.2f} s" if x < 10 else f"{x:.1f} s"

    head = (
        f"Taken {datetime.now(timezone.utc):%Y-%m-%d} on {machine()}. Settings: `--threads {args.threads}`, "
        f"batch size {args.batch_size}, `{args.dtype}`, the `{args.workload}` workload, medians of "
        f"{args.repeat} runs ({args.repeat_tiny} for the tiny pairs, "
        f"{args.repeat_large} at 8,192 tokens or more)"
        + (", bare passes also in workload order" if args.in_order else "")
        + "."
    )
    out = [
        head,
        "",
        "| pair | budget | rows | bare forward | backbone | diagnostics | ratio | ÷ backbone | "
        "in order | capture | CKA | T3 | T4 | peak RSS |",
        "| --- " * 14 + "|",
    ]
    for r in rows:
        t = r["per_tool_s"]
        unit = " words" if r["pair"] == "gemma" else ""  # two tokenizers: rows are pooled per word
        in_order = f"{r['ratio_in_order']:.2f}" if "ratio_in_order" in r else "—"
        cells = [
            PAIR_NAMES.get(r["pair"], r["pair"]),
            f"{r['max_tokens']:,}",
            f"{r['n_rows']:,}{unit}",
            s(r["bare_forward_s"]),
            s(r["backbone_forward_s"]),
            s(r["diagnostics_s"]),
            f"{r['ratio']:.2f}",
            f"{r['ratio_backbone']:.2f}",
            in_order,
            s(r["capture_s"]),
            s(r["cka_s"]),
            s(t["procrustes"]),
            s(t["bridge-check"]),
            f"{r['peak_rss_mib'] / 1024:.1f} GiB",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--pairs", default="tiny,smollm2,gemma", help="gemma is skipped, with a line, until `make gemma`"
    )
    ap.add_argument("--budgets", default="512,2048,8192", help="token budgets (comma-separated)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workload", default="scale", help="'scale', 'concept' or a workload file")
    ap.add_argument("--repeat", type=int, default=3, help="repeats per pair and budget (median reported)")
    ap.add_argument(
        "--repeat-tiny",
        type=int,
        default=15,
        help="repeats for the tiny pairs (their passes take milliseconds)",
    )
    ap.add_argument(
        "--repeat-large", type=int, default=1, help="repeats for real models at 8,192 tokens or more"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0 = torch's default: every core, as the app runs)",
    )
    ap.add_argument(
        "--in-order",
        action="store_true",
        help="also time bare passes in workload order (how this bench batched before the capture sorted by "
        "length)",
    )
    ap.add_argument("--json", default="")
    ap.add_argument(
        "--markdown",
        action="store_true",
        help="end with the table of docs/measurements.md (machine, settings, date)",
    )
    ap.add_argument(
        "--child", action="store_true", help=argparse.SUPPRESS
    )  # one pair, one budget, JSON on stdout
    args = ap.parse_args()
    if args.child:
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        donor, target = PAIRS[args.pairs]
        print(json.dumps(bench_pair(args.pairs, donor, target, int(args.budgets), args)))
        return
    workload = workload_path(args.workload)
    rows = []
    for name in args.pairs.split(","):
        if name == "gemma" and not (builtin_folder(GEMMA3) / "config.json").exists():
            print("gemma    skipped: gemma3-270m is not prepared (make gemma)", flush=True)
            continue
        for budget in args.budgets.split(","):
            repeat = (
                args.repeat_tiny
                if name.startswith("tiny")
                else args.repeat
                if int(budget) < 8192
                else args.repeat_large
            )
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--pairs",
                name,
                "--budgets",
                budget,
                "--batch-size",
                str(args.batch_size),
                "--device",
                args.device,
                "--dtype",
                args.dtype,
                "--workload",
                workload,
                "--repeat",
                str(repeat),
                "--threads",
                str(args.threads),
            ] + (["--in-order"] if args.in_order else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} at {budget} tokens failed:\n{proc.stderr[-2000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["workload"] = args.workload
            rows.append(r)
            print(line(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.markdown:
        print()
        print(markdown(rows, args))


if __name__ == "__main__":
    main()
