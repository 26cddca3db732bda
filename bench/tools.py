"""What the newer tools cost on the demo pair: T5 on the demo adapter, T9 per position, T13 per question.

Each is timed through ``run_tool`` (the code path of the CLI and the app) and divided by a bare
forward pass measured in the same run, so the numbers carry across machines:

* **T5** (``cartography --adapter <demo donor>``): seconds ÷ one bare forward pass of the base
  (SmolLM2) over the bundled workload. T5 reads weights only; the ratio says what it costs next to
  the capture the alignment tools start with.
* **T9** (``position-sweep`` of the demo donor's blocks s..s+k-1 into SmolLM2, direct): seconds per
  position ÷ the same forward pass (each position evaluates concept and retained perplexity).
* **T13** (``attribution`` of a K-module swap, T, T′ and D on one question each): seconds per
  model and question ÷ one forward pass of that question's prompt (how many forward-pass
  equivalents captum's integrated gradients need, with the steps doubling per layer until the
  convergence delta is within tolerance).

    python bench/tools.py [--questions 0] [--positions 0,10,20] [--k 128] [--max-steps 128] [--json out.json]

Needs the demo donor (``make prepare``). One thread is the default (``--threads``), as in
docs/measurements.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine.tools  # noqa: E402, F401  (registers every tool: the registry never imports them)
from engine.core.data import builtin_concept_path, load_workload  # noqa: E402
from engine.evaluation.beforeafter import load_sets  # noqa: E402
from engine.loading.models import DEMO_DONOR, SMOLLM2, ModelSpec, ModelStore  # noqa: E402
from engine.loading.tokens import encode_prompt  # noqa: E402
from engine.measure.budget import MAX_TOKENS_PER_TEXT  # noqa: E402
from engine.running.runner import run_tool  # noqa: E402


@torch.no_grad()
def bare_forward(model, texts: list[str], batch_size: int = 8) -> float:
    tok = model.tokenizer
    tok.padding_side = "right"
    t0 = time.perf_counter()
    for b in range(0, len(texts), batch_size):
        enc = tok(
            texts[b : b + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS_PER_TEXT,
        )
        model.model(
            input_ids=enc["input_ids"].to(model.device),
            attention_mask=enc["attention_mask"].to(model.device),
            use_cache=False,
        )
    return time.perf_counter() - t0


@torch.no_grad()
def prompt_forward(model, question: str, repeat: int = 5) -> float:
    """One forward pass of the question's prompt as T13 builds it (median of ``repeat``)."""
    ids = torch.tensor([encode_prompt(model.tokenizer, question)], device=model.device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        model.model(input_ids=ids, use_cache=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--questions", default="0", help="T13: comma-separated test question indices of the concept set"
    )
    ap.add_argument("--positions", default="0,10,20", help="T9: positions p")
    ap.add_argument("--start", type=int, default=10, help="T9: the organ's first donor block s")
    ap.add_argument("--size", type=int, default=3, help="T9: the organ's number of blocks k")
    ap.add_argument(
        "--k", type=int, default=128, help="T13: modules swapped (docs/measurements.md's K = 128)"
    )
    ap.add_argument("--max-steps", type=int, default=128, help="T13: max_steps (the tool's default is 128)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma-separated of t5,t9,t13 to leave out")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    store = ModelStore()
    donor, target = ModelSpec.parse(DEMO_DONOR), ModelSpec.parse(SMOLLM2)
    base = store.get(target)
    texts = load_workload(str(builtin_concept_path())).texts
    bare_forward(base, texts)  # warm-up
    fwd = statistics.median(bare_forward(base, texts) for _ in range(3))
    out: dict = {"threads": args.threads, "bare_forward_s": fwd, "workload_texts": len(texts)}
    print(
        f"bare forward pass of SmolLM2 over the bundled workload ({len(texts)} texts): {fwd:.2f} s",
        flush=True,
    )

    if "t5" not in skip:
        env = run_tool("cartography", adapter=DEMO_DONOR, store=store)
        s = env["meta"]["compute_seconds"]
        n = len(env["result"]["cells"])
        out["t5"] = {"seconds": s, "ratio": s / fwd, "load_seconds": env["meta"]["load_seconds"]}
        print(
            f"T5 on the demo adapter: {s:.2f} s compute ({env['meta']['load_seconds']:.2f} s loading the "
            "adapter)"
            f" = {s / fwd:.2f}x the bare forward pass; {n} modules",
            flush=True,
        )

    if "t9" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            organ = str(Path(tmp) / "organ")
            run_tool(
                "organ-extract",
                donor,
                params={"start": args.start, "size": args.size, "out": organ},
                store=store,
            )
            positions = [p for p in args.positions.split(",") if p.strip()]
            env = run_tool(
                "position-sweep",
                target=target,
                organ=organ,
                params={"positions": args.positions, "mode": "direct"},
                store=store,
            )
        s = env["meta"]["compute_seconds"] / len(positions)
        out["t9"] = {"seconds_per_position": s, "ratio": s / fwd, "positions": positions}
        print(
            f"T9 direct, organ = demo donor blocks {args.start}..{args.start + args.size - 1}, p = "
            f"{args.positions}: "
            f"{s:.2f} s per position = {s / fwd:.2f}x the bare forward pass",
            flush=True,
        )

    if "t13" not in skip:
        test = load_sets("", "")[0].test_qa()
        rows = []
        for q in [int(x) for x in args.questions.split(",") if x.strip()]:
            env = run_tool(
                "attribution",
                donor,
                target,
                params={"question": q, "k": args.k, "max_steps": args.max_steps},
                store=store,
            )
            r = env["result"]
            f1 = prompt_forward(base, test[q].question)
            secs = env["meta"]["attribution_seconds"]
            row = {
                "question": q,
                "seconds": secs,
                "prompt_forward_s": f1,
                "forward_equivalents": {k: v / f1 for k, v in secs.items()},
                "max_rel_delta": r["max_rel_delta"],
                "unreliable": {k: len(v) for k, v in r["unreliable"].items()},
                "tokens": len(r["models"]["target"]["tokens"]),
                "layers": len(r["models"]["target"]["layers"]),
            }
            rows.append(row)
            print(
                f"T13 question {q} ({row['tokens']} tokens x {row['layers']} layers): "
                + ", ".join(f"{k} {v:.1f} s ({v / f1:,.0f} forward passes)" for k, v in secs.items())
                + f"; largest relative delta {r['max_rel_delta']}; unreliable layers {row['unreliable']}",
                flush=True,
            )
        per_model = [v for row in rows for v in row["seconds"].values()]
        out["t13"] = {"rows": rows, "median_seconds_per_model_question": statistics.median(per_model)}
        print(
            f"T13: median {statistics.median(per_model):.1f} s per model and question "
            f"({len(rows)} question(s) x {len(rows[0]['seconds'])} models)",
            flush=True,
        )

    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
