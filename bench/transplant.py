"""Cost of a reversible module swap (engine.surgery.transplant.ModuleSwap).

For each pair and each K (modules spread evenly over the swappable ones): time to materialise
the working copy, median apply and rollback times over ``--repeat`` cycles, and the extra memory
the working copy holds divided by the bytes of the swapped tensors (distinct storages not shared
with the cached target; 1.0 = only the swapped tensors are new). Every cycle checks that the
rollback is bit-exact (weight hash) and that the cached target is untouched. Usage:

    python bench/transplant.py [--pairs tiny,smollm2] [--k 8,32] [--repeat 5] [--device cpu] [--dtype float32]

The SmolLM2 pair is the demo donor (SmolLM2 + concept LoRA) into SmolLM2 when the donor is
built ("ready" in engine.loading.builtins.builtin_status()); otherwise SmolLM2 into itself, which costs the
same (the copied bytes do not depend on their values), and the output says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.loading.builtins import DEMO_DONOR, SMOLLM2, builtin_status
from engine.loading.models import ModelSpec, ModelStore
from engine.surgery.transplant import ModuleSwap, swappable_modules  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def spread(names: list[str], k: int) -> list[str]:
    """``k`` names evenly spaced over the list (every kind and depth represented)."""
    k = min(k, len(names))
    return [names[round(i * (len(names) - 1) / max(k - 1, 1))] for i in range(k)] if k > 1 else names[:k]


def bench_pair(
    label: str, donor_name: str, target_name: str, ks: list[int], args, note: str = ""
) -> list[dict]:
    store = ModelStore()
    target = store.get(ModelSpec.parse(target_name), args.device, args.dtype)
    donor = store.get(ModelSpec.parse(donor_name), args.device, args.dtype)
    h_target = target.state_hash()
    mods, _ = swappable_modules(donor, target)
    names = [m.name for m in mods]
    rows = []
    for k in ks:
        swap = ModuleSwap(target, donor, spread(names, k))
        t0 = time.perf_counter()
        swap.materialise()
        t_mat = time.perf_counter() - t0
        extra_idle = swap.extra_bytes()
        applies, rollbacks, exact = [], [], True
        for _ in range(args.repeat):
            _sync(target.device)
            t0 = time.perf_counter()
            swap.apply()
            _sync(target.device)
            applies.append(time.perf_counter() - t0)
            extra_applied = swap.extra_bytes()
            t0 = time.perf_counter()
            swap.rollback()
            _sync(target.device)
            rollbacks.append(time.perf_counter() - t0)
            exact &= swap.weight_hash() == h_target
        exact &= swap.verify_rollback() and target.state_hash() == h_target
        sb = swap.swapped_bytes
        rows.append(
            {
                "pair": label,
                "donor": donor_name,
                "target": target_name,
                "k": len(swap.modules),
                "n_swappable": len(names),
                "n_tensors": swap.n_tensors,
                "swapped_mib": round(sb / 2**20, 3),
                "materialise_ms": round(1e3 * t_mat, 3),
                "apply_ms_median": round(1e3 * statistics.median(applies), 3),
                "rollback_ms_median": round(1e3 * statistics.median(rollbacks), 3),
                "extra_over_swapped": round(extra_idle / sb, 4),
                "extra_over_swapped_applied": round(extra_applied / sb, 4),
                "rollback_bit_exact": bool(exact),
                "note": note,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="tiny,smollm2")
    ap.add_argument("--k", default="8,32", help="comma-separated numbers of modules to swap")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args()
    ks = [int(k) for k in args.k.split(",") if k.strip()]
    rows: list[dict] = []
    for pair in [p.strip() for p in args.pairs.split(",") if p.strip()]:
        if pair == "tiny":
            rows += bench_pair("tiny", "tiny-gpt2-a", "tiny-gpt2-b", ks, args)
            rows += bench_pair("tiny", "tiny-llama-a", "tiny-llama-b", ks, args)
        elif pair == "smollm2":
            status = builtin_status()
            if status[SMOLLM2]["state"] == "unavailable":
                print(f"skipping smollm2: {SMOLLM2} is unavailable", file=sys.stderr)
                continue
            if status[DEMO_DONOR]["state"] == "ready":
                rows += bench_pair("smollm2", DEMO_DONOR, SMOLLM2, ks, args)
            else:
                rows += bench_pair(
                    "smollm2",
                    SMOLLM2,
                    SMOLLM2,
                    ks,
                    args,
                    note=f"demo donor {DEMO_DONOR} is '{status[DEMO_DONOR]['state']}': SmolLM2 swapped "
                    "with itself",
                )
        else:
            raise SystemExit(f"unknown pair {pair!r}: use tiny, smollm2")
    cols = (
        "pair",
        "target",
        "k",
        "n_tensors",
        "swapped_mib",
        "materialise_ms",
        "apply_ms_median",
        "rollback_ms_median",
        "extra_over_swapped",
        "extra_over_swapped_applied",
        "rollback_bit_exact",
    )
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols) + (f"   ({r['note']})" if r["note"] else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
