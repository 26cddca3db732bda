"""Old vs new results of T1-T4: save every tool's result once, then compare a later run with it.

Used to check that a speed change leaves the diagnostics' numbers where they were. Usage:

    python bench/alignment_check.py --save old.json [--pairs tiny,smollm2] [--budgets 512,2048]
    python bench/alignment_check.py --compare old.json   # max |new - old| per field, per tool

Numbers are compared leaf by leaf (lists element-wise); any other difference (a rank, a matched
pair, a warning) is listed as a mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alignment import PAIRS, TOOLS, workload_path  # noqa: E402  (bench/ is on sys.path when run as a script)

import engine.tools  # noqa: E402, F401  (registers every tool: the registry never imports them)
from engine.loading.models import ModelSpec, ModelStore  # noqa: E402
from engine.measure.capture_cache import CaptureCache  # noqa: E402
from engine.running.runner import run_tool  # noqa: E402


def results(pairs: list[str], budgets: list[int], workload: str) -> dict[str, Any]:
    store = ModelStore()
    out: dict[str, Any] = {}
    for name in pairs:
        d, t = (store.get(ModelSpec.parse(m), "auto", "float32") for m in PAIRS[name])
        for budget in budgets:
            cache = CaptureCache()
            for tool in TOOLS:
                out[f"{name}/{budget}/{tool}"] = run_tool(
                    tool, d, t, {"max_tokens": budget, "workload": workload}, captures=cache
                )["result"]
    return out


def diff(old: Any, new: Any, path: str, maxdiff: dict[str, float], mismatches: list[str]) -> None:
    """Max |new - old| per field path (list indices dropped) into ``maxdiff``; other differences into
    ``mismatches``."""
    if isinstance(old, bool) or isinstance(new, bool) or old is None or new is None or isinstance(old, str):
        if old != new:
            mismatches.append(f"{path}: {old!r} -> {new!r}")
    elif isinstance(old, (int, float)) and isinstance(new, (int, float)):
        maxdiff[path] = max(maxdiff.get(path, 0.0), abs(float(new) - float(old)))
    elif isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if k not in old or k not in new:
                mismatches.append(f"{path}.{k}: present in only one")
            else:
                diff(old[k], new[k], f"{path}.{k}", maxdiff, mismatches)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for a, b in zip(old, new):
            diff(a, b, f"{path}[]", maxdiff, mismatches)
    elif old != new:
        mismatches.append(f"{path}: {str(old)[:60]} -> {str(new)[:60]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="tiny,smollm2")
    ap.add_argument("--budgets", default="512,2048")
    ap.add_argument(
        "--workload", default="concept", help="'concept', 'scale' (see bench/alignment.py) or a file"
    )
    ap.add_argument("--save", default="")
    ap.add_argument("--compare", default="")
    args = ap.parse_args()
    if bool(args.save) == bool(args.compare):
        ap.error("give exactly one of --save, --compare")
    if args.save:
        out = results(
            args.pairs.split(","), [int(b) for b in args.budgets.split(",")], workload_path(args.workload)
        )
        Path(args.save).write_text(json.dumps({"workload": args.workload, "results": out}))
        return
    saved = json.loads(Path(args.compare).read_text())
    old = saved["results"]
    pairs = sorted({k.split("/")[0] for k in old})
    budgets = sorted({int(k.split("/")[1]) for k in old})
    new = results(pairs, budgets, workload_path(saved["workload"]))
    worst = 0.0
    for key in old:
        maxdiff: dict[str, float] = {}
        mismatches: list[str] = []
        diff(old[key], new[key], "", maxdiff, mismatches)
        top = max(maxdiff.values(), default=0.0)
        worst = max(worst, top)
        print(f"{key}: max |diff| {top:.2e}" + (f", {len(mismatches)} mismatch(es)" if mismatches else ""))
        for f, v in sorted(maxdiff.items()):
            if v > 0:
                print(f"    {f:40s} {v:.2e}")
        for m in mismatches[:10]:
            print(f"    MISMATCH {m}")
    print(f"worst max |diff| over all fields: {worst:.2e}")


if __name__ == "__main__":
    main()
