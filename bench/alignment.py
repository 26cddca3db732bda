"""Cost of the pre-surgery diagnostics, as ratios taken within one run.

For each pair: ratio = (activation capture + T1 + T2 + T3 + T4) / (bare forward passes of both
models over the same budgeted texts, same batching, no hooks). Also the peak process memory
(RSS) and, on CUDA, the peak GPU memory. Usage:

    python bench/alignment.py [--pairs tiny,smollm2] [--max-tokens 2048] [--device auto] [--dtype float32] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.capture import CaptureCache, MAX_TOKENS_PER_TEXT, budget_texts  # noqa: E402
from engine.context import resolve_workload, run_tool  # noqa: E402
from engine.models import DEMO_DONOR, SMOLLM2, ModelSpec, ModelStore  # noqa: E402

PAIRS = {"tiny": ("tiny-gpt2-a", "tiny-gpt2-b"), "tiny-cross": ("tiny-gpt2-a", "tiny-llama-b"), "smollm2": (DEMO_DONOR, SMOLLM2)}
TOOLS = ("compat", "cka", "procrustes", "bridge-check")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@torch.inference_mode()
def bare_forward(model, texts, batch_size) -> float:
    tok = model.tokenizer
    tok.padding_side = "right"
    t0 = time.perf_counter()
    for b in range(0, len(texts), batch_size):
        enc = tok(texts[b:b + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=MAX_TOKENS_PER_TEXT)
        model.model(input_ids=enc["input_ids"].to(model.device), attention_mask=enc["attention_mask"].to(model.device), use_cache=False)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_pair(name: str, donor: str, target: str, args) -> dict:
    store = ModelStore()
    opts = {"max_tokens": args.max_tokens, "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size,
            "workload": args.workload}
    d = store.get(ModelSpec.parse(donor), args.device, args.dtype)
    t = store.get(ModelSpec.parse(target), args.device, args.dtype)
    texts = budget_texts(resolve_workload(args.workload).texts, [d.tokenizer, t.tokenizer], args.max_tokens)
    bare_forward(d, texts[:2], args.batch_size)  # warm-up (allocator, kernels)
    bare_forward(t, texts[:2], args.batch_size)
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bare, diag, per_tool = [], [], {k: [] for k in TOOLS}
    for _ in range(args.repeat):
        bare.append(bare_forward(d, texts, args.batch_size) + bare_forward(t, texts, args.batch_size))
        cache = CaptureCache()  # fresh: the capture is part of what we time
        t0 = time.perf_counter()
        for tool in TOOLS:
            t1 = time.perf_counter()
            run_tool(tool, d, t, opts, captures=cache)
            per_tool[tool].append(time.perf_counter() - t1)
        diag.append(time.perf_counter() - t0)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    out = {
        "pair": name, "donor": donor, "target": target, "device": str(d.device), "dtype": args.dtype,
        "n_texts": len(texts), "max_tokens": args.max_tokens,
        "bare_forward_s": round(med(bare), 4), "diagnostics_s": round(med(diag), 4),
        "ratio": round(med(diag) / med(bare), 3),
        "per_tool_s": {k: round(med(v), 4) for k, v in per_tool.items()},
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    if d.device.type == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="tiny,smollm2")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workload", default="")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    rows = []
    for name in args.pairs.split(","):
        donor, target = PAIRS[name]
        r = bench_pair(name, donor, target, args)
        rows.append(r)
        print(f"{name:10s} {r['device']:5s} texts={r['n_texts']:4d} bare={r['bare_forward_s']:.3f}s "
              f"diagnostics={r['diagnostics_s']:.3f}s ratio={r['ratio']:.2f} peak_rss={r['peak_rss_mib']:.0f}MiB "
              + (f"peak_gpu={r['peak_gpu_mib']:.0f}MiB " if "peak_gpu_mib" in r else "")
              + " ".join(f"{k}={v:.3f}s" for k, v in r["per_tool_s"].items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
