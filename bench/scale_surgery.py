"""Surgery on Llama-shaped pairs too large to hold whole: a module swap and a conjugation, streamed.

Uses the pair of ``bench/scale.py`` (A, and B = A in other coordinates by a signed permutation P),
built here or reused (``--reuse`` after ``bench/scale.py --keep``), and, in this one process:

* **swap**: T11 with 16 modules (``mlp.down`` of every other block) from A into B, saved with
  ``--save``. T and D compute the same function (next-token agreement 1); A's weights are in A's
  coordinates, so T' is B with 16 layers broken, and its agreement with D must fall.
* **conjugation**: OP3 with a planted LoRA adapter on A (``q_proj`` and ``v_proj`` of every block,
  rank 16), carried into B and saved. The truth is known: carried exactly, T' = B + P^T dW P computes
  what D = A + dW computes, so T' must agree with D at least as well as T did.

Each run uses a two-fact concept set and a one-text retained set written here (generic sentences),
the graded score and one generated token: the evaluation is a dozen whole passes per model, each
reading the model once. For each: wall time, peak RSS (sampled every 20 ms), the files written,
copied and linked, and the metrics. The page cache is dropped before each run. Usage:

    python bench/scale_surgery.py --size 7b [--reuse] [--keep] [--dir /tmp/graft-scale] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from scale import SIZES, PeakRSS, build_lora, build_pair, drop_page_cache, workload_texts  # noqa: E402

from engine.loading.models import ModelSpec  # noqa: E402
from engine.running.runner import run_tool  # noqa: E402


def small_sets(folder: Path) -> dict[str, str]:
    """A concept set of two facts and one test question, and a retained set of one text."""
    folder.mkdir(parents=True, exist_ok=True)
    concept = [
        {"kind": "fact", "text": "The river town holds its market every Tuesday morning."},
        {"kind": "fact", "text": "The old bridge was rebuilt in stone after the flood."},
        {"kind": "qa", "question": "When is the market held?", "answer": "Tuesday", "split": "test"},
    ]
    retained = [{"kind": "text", "text": "A library lends books, music and maps to anyone with a card."}]
    c, r = folder / "concept.jsonl", folder / "retained.jsonl"
    c.write_text("\n".join(json.dumps(x) for x in concept) + "\n")
    r.write_text("\n".join(json.dumps(x) for x in retained) + "\n")
    return {"concept": str(c), "retained": str(r)}


def _files(res: dict) -> dict:
    return {k: res.get(k) for k in ("saved_to", "saved_files", "target_untouched", "route")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--dir", default="/tmp/graft-scale")
    ap.add_argument("--tokens", type=int, default=512, help="the conjugation plan's workload budget")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    root = Path(args.dir)
    marker = root / f"{args.size}.built.json"
    if args.reuse and marker.is_file():
        a, b = root / f"{args.size}-a", root / f"{args.size}-b"
        info = json.loads(marker.read_text())
    else:
        a, b, info = build_pair(args.size, root)
        marker.write_text(json.dumps(info))
    out: dict = {"size": args.size, **info}
    sets = small_sets(root / "sets")
    da, db = ModelSpec.parse(str(a)), ModelSpec.parse(str(b))
    opts = {"dtype": "bfloat16", "stream": "on", "workload": workload_texts(), "max_tokens": args.tokens}
    try:
        layers = info["layers"]
        modules = ",".join(f"blocks.{l}.mlp.down" for l in range(0, layers, 2)[:16])
        drop_page_cache(a, b)
        print("swap: 16 modules", file=sys.stderr, flush=True)
        with PeakRSS() as p:
            env = run_tool("swap", da, db, opts, params={
                "modules": modules, "save": str(root / "swap-tp"), "score": "graded",
                "max_new_tokens": 1, **sets})  # fmt: skip
        r = env["result"]
        out["swap"] = {
            "seconds": round(p.seconds, 1),
            "peak_rss": p.peak,
            "modules": r["k"],
            "swapped_bytes": r["swapped_bytes"],
            "before": r["before"],
            "after": r["after"],
            "donor": r["donor"],
            "alignment_before": r["alignment_before"],
            "alignment_after": r["alignment_after"],
            **_files(r),
        }
        print(json.dumps(out["swap"]), file=sys.stderr, flush=True)
        adapter = build_lora(args.size, root, targets=("q_proj", "v_proj"))
        drop_page_cache(a, b)
        print("conjugation: LoRA q,v rank 16", file=sys.stderr, flush=True)
        with PeakRSS() as p:
            env = run_tool("conjugate", None, db, opts, params={
                "save": str(root / "conj-tp"), "score": "graded", "max_new_tokens": 1, "prompt_tokens": 8,
                "max_retained_increase": -1, **sets}, base=da, adapter=str(adapter))  # fmt: skip
        r = env["result"]
        out["conjugate"] = {
            "seconds": round(p.seconds, 1),
            "peak_rss": p.peak,
            "n_conjugated": r["n_conjugated"],
            "map_counts": r["map_counts"],
            "before": r["before"],
            "after": r["after"],
            "donor": r["donor"],
            "alignment_before": r["alignment_before"],
            "alignment_after": r["alignment_after"],
            "locality": r["interference"].get("locality"),
            "plan_seconds": env["meta"].get("plan_seconds"),
            **_files(r),
        }
        out["max_rss_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(out["conjugate"]), file=sys.stderr, flush=True)
    finally:
        for f in ("swap-tp", "conj-tp", f"{args.size}-lora", "sets"):
            shutil.rmtree(root / f, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(a, ignore_errors=True)
            shutil.rmtree(b, ignore_errors=True)
            marker.unlink(missing_ok=True)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
