"""Surgery on Llama-shaped pairs too large to hold whole: a module swap and a conjugation, streamed.

Uses the pair of ``bench/scale.py`` (A, and B = A in other coordinates by a signed permutation P),
built here or reused (``--reuse`` after ``bench/scale.py --keep``), and, in this one process:

* **swap**: T11 with 16 modules (``mlp.down`` of every other block) from A into B, saved with
  ``--save``. T and D compute the same function (next-token agreement 1); A's weights are in A's
  coordinates, so T' is B with 16 layers broken, and its agreement with D must fall.
* **conjugation**: OP3 with a planted LoRA adapter on A (``q_proj`` and ``v_proj`` of every block,
  rank 16), carried into B and saved. The truth is known: carried exactly, T' = B + P^T dW P computes
  what D = A + dW computes, so T' must agree with D at least as well as T did.

* **T12** (interference) on the same 16-module swap, made on the spot: T' staged beside B and
  removed after, T and T' read block by block, both stability checks (T' written twice; read afresh).
* **T9** (position sweep, direct): B's own blocks 10-12 extracted (streamed: only those blocks are
  read) and inserted at position 10, where T' is B to the bit (its perplexities must equal B's), and
  at position 4, where they must not.

Each run uses a two-fact concept set and a one-text retained set written here (generic sentences),
the graded score and one generated token: the evaluation is a dozen whole passes per model, each
reading the model once. For each: wall time, peak RSS (sampled every 20 ms), the files written,
copied and linked, and the metrics. The page cache is dropped before each run. Usage:

    python bench/scale_surgery.py --size 7b [--runs swap,t12,t9,conjugate] [--reuse] [--keep]
        [--dir /tmp/graft-scale] [--json out.json]
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
    four = retained + [
        {"kind": "text", "text": t}
        for t in (
            "The train to the coast leaves twice an hour on weekdays.",
            "Bread rises because yeast turns sugar into gas.",
            "Most maps put north at the top of the page.",
        )
    ]
    c, r, r4 = folder / "concept.jsonl", folder / "retained.jsonl", folder / "retained4.jsonl"
    c.write_text("\n".join(json.dumps(x) for x in concept) + "\n")
    r.write_text("\n".join(json.dumps(x) for x in retained) + "\n")
    r4.write_text("\n".join(json.dumps(x) for x in four) + "\n")
    return {"concept": str(c), "retained": str(r), "_retained4": str(r4)}


def _files(res: dict) -> dict:
    return {k: res.get(k) for k in ("saved_to", "saved_files", "target_untouched", "route")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--dir", default="/tmp/graft-scale")
    ap.add_argument("--tokens", type=int, default=512, help="the conjugation plan's workload budget")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--runs", default="swap,conjugate", help="comma-separated: swap, t12, t9, conjugate")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    runs = {r.strip() for r in args.runs.split(",") if r.strip()}
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
    four = sets.pop("_retained4")  # T12's retained set: four texts
    da, db = ModelSpec.parse(str(a)), ModelSpec.parse(str(b))
    opts = {"dtype": "bfloat16", "stream": "on", "workload": workload_texts(), "max_tokens": args.tokens}
    try:
        layers = info["layers"]
        modules = ",".join(f"blocks.{l}.mlp.down" for l in range(0, layers, 2)[:16])
        if "swap" in runs:
            _swap(out, da, db, opts, modules, root, sets)
        if "t12" in runs:
            _t12(out, a, b, da, db, opts, modules, four)
        if "t9" in runs:
            _t9(out, a, b, db, opts, root, sets)
        if "conjugate" in runs:
            _conjugate(out, a, b, da, db, opts, root, sets, args.size)
        out["max_rss_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    finally:
        for f in ("swap-tp", "conj-tp", f"{args.size}-lora", "sets", "organ"):
            shutil.rmtree(root / f, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(a, ignore_errors=True)
            shutil.rmtree(b, ignore_errors=True)
            marker.unlink(missing_ok=True)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


def _t12(out: dict, a: Path, b: Path, da, db, opts: dict, modules: str, retained: str) -> None:
    drop_page_cache(a, b)
    print("T12: the 16-module swap on the spot", file=sys.stderr, flush=True)
    with PeakRSS() as p:
        t12 = {"modules": modules, "retained": retained, "max_new_tokens": 4, "prompt_tokens": 8}
        env = run_tool("interference", da, db, opts, params=t12)
    r = env["result"]
    ret = r["retained"]
    out["t12"] = {
        "seconds": round(p.seconds, 1),
        "peak_rss": p.peak,
        "texts": ret["n_examples"],
        "max_new_tokens": r["settings"]["max_new_tokens"],
        "ppl_before": ret["ppl_before"],
        "ppl_after": ret["ppl_after"],
        "locality": r["locality"],
        "stability": {k: {"passed": v["passed"], "detail": v["detail"]} for k, v in r["stability"].items()},
        "leftovers": sorted(x.name for x in b.parent.iterdir() if x.name.startswith(f".{b.name}.")),
    }
    print(json.dumps(out["t12"]), file=sys.stderr, flush=True)


def _t9(out: dict, a: Path, b: Path, db, opts: dict, root: Path, sets: dict) -> None:
    drop_page_cache(a, b)
    print("T9: B's own blocks 10-12 at positions 10 and 4", file=sys.stderr, flush=True)
    organ = root / "organ"
    with PeakRSS() as p:
        run_tool("organ-extract", db, None, opts, params={"start": 10, "size": 3, "out": str(organ)})
        env = run_tool("position-sweep", target=db, organ=str(organ), options=opts, params={
            "positions": "10,4", "strategy": "direct", "epsilon": False, **sets})  # fmt: skip
    r = env["result"]
    out["t9"] = {
        "seconds": round(p.seconds, 1),
        "peak_rss": p.peak,
        "baseline": r["baseline"],
        "points": [
            {k: pt[k] for k in ("position", "ppl_concept", "ppl_retained", "task_score")}
            for pt in r["points"]
        ],
        "insertions": env["meta"].get("streamed_insertions"),
    }
    print(json.dumps(out["t9"]), file=sys.stderr, flush=True)


def _swap(out: dict, da, db, opts: dict, modules: str, root: Path, sets: dict) -> None:
    drop_page_cache(Path(da.ref), Path(db.ref))
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


def _conjugate(out: dict, a: Path, b: Path, da, db, opts: dict, root: Path, sets: dict, size: str) -> None:
    adapter = build_lora(size, root, targets=("q_proj", "v_proj"))
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
    print(json.dumps(out["conjugate"]), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
