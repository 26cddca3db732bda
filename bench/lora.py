"""Cost and exactness of Model Surgery stage 1 (engine.adapters.lora, T5 / T6).

1. **Factored spectrum vs dense SVD** at ``d x d`` with a rank-``r`` update ``B @ A`` (default
   d = 2048, r = 16): ``factored_svd`` (QR of B and A^T, SVD of the r x r core) against a dense
   ``svdvals`` of the formed product, in float32 and float64 (product formation included in the
   dense times). Median over repeats; the error is the largest absolute difference of the r
   singular values against the float64 dense reference, relative to the largest one.
2. **T5 on a full fine-tune of SmolLM2**: the demo donor's merged model against
   SmolLM2-135M-Instruct, ``dW = W_D - W_T`` for all 210 linear modules. The randomized
   truncated SVD of ``finetune_deltas`` (rank ``--rank``, no cache) and the whole ``cartography``
   tool run, against a dense float64 ``svdvals`` of every ``dW``. Reported: times, the largest
   relative error of the top singular value and of the top-``rank`` singular values, the exact
   energy check, and whether the top 10 modules by energy agree. When the demo donor's adapter is
   there, T5 from the adapter is compared with T5 from the full fine-tune (the merged donor is
   base + that adapter, so both should map the concept the same way).

Usage::

    python bench/lora.py [--d 2048] [--r 16] [--repeat 20] [--rank 16] [--threads N] [--skip-smollm2]
    [--json out.json]

Run it alone: part 2 loads two 135M-parameter models.
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

import engine.tools  # noqa: E402, F401  (registers every tool: the registry never imports them)
from engine.adapters.finetune_delta import finetune_deltas  # noqa: E402
from engine.adapters.lowrank import factored_svd  # noqa: E402
from engine.loading.arch import linear_weight_out_in  # noqa: E402


def _median_time(fn, repeat: int) -> tuple[float, object]:
    out = None
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_factored(d: int, r: int, repeat: int, dense_repeat: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(d, r, generator=gen) / r**0.5
    A = torch.randn(r, d, generator=gen) / d**0.5
    factored_svd(B, A)  # warm-up
    t_fac, (_, S, _) = _median_time(lambda: factored_svd(B, A), repeat)
    t_d32, S32 = _median_time(lambda: torch.linalg.svdvals(B @ A), dense_repeat)
    t_d64, S64 = _median_time(lambda: torch.linalg.svdvals(B.double() @ A.double()), dense_repeat)
    ref = S64[:r]
    err = float((S - ref).abs().max() / ref[0])
    err32 = float((S32[:r].double() - ref).abs().max() / ref[0])
    return {
        "d": d,
        "r": r,
        "factored_s": t_fac,
        "dense_f32_s": t_d32,
        "dense_f64_s": t_d64,
        "speedup_vs_f32": t_d32 / t_fac,
        "speedup_vs_f64": t_d64 / t_fac,
        "factored_rel_err": err,
        "dense_f32_rel_err": err32,
    }


def bench_smollm2(rank: int) -> dict:
    from engine.loading.models import DEMO_DONOR, SMOLLM2, ModelSpec, ModelStore, demo_donor_ready
    from engine.running.runner import run_tool

    if not demo_donor_ready():
        return {"skipped": "the demo donor is not built (python -m engine prepare)"}
    store = ModelStore()
    t0 = time.perf_counter()
    base = store.get(ModelSpec.parse(SMOLLM2), "cpu")
    donor = store.get(ModelSpec.parse(DEMO_DONOR), "cpu")
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    deltas = finetune_deltas(donor, base, rank, cache=False)
    t_rand = time.perf_counter() - t0

    t0 = time.perf_counter()
    cart = run_tool("cartography", donor, None, {}, {"rank": rank}, base=base)["result"]
    t_tool = time.perf_counter() - t0

    # Dense reference: float64 svdvals of every dW.
    dense = {}
    t0 = time.perf_counter()
    for m in donor.arch.linear_modules():
        wd = linear_weight_out_in(donor.arch.module(m.path)).detach().double()
        wb = linear_weight_out_in(base.arch.module(m.path)).detach().double()
        dense[m.name] = torch.linalg.svdvals(wd - wb)
    t_dense = time.perf_counter() - t0

    top_err, k_err, energy_err = 0.0, 0.0, 0.0
    for d in deltas:
        S_ref = dense[d.name]
        S = torch.linalg.norm(d.B.double(), dim=0)  # B = U diag(S): column norms are the singular values
        top_err = max(top_err, float(abs(S[0] - S_ref[0]) / S_ref[0]))
        k = S.numel()
        k_err = max(k_err, float(((S - S_ref[:k]).abs() / S_ref[0]).max()))
        energy_err = max(energy_err, abs(d.frob_norm - float(S_ref.norm())) / float(S_ref.norm()))
    dense_rank = sorted(dense, key=lambda n: -float(dense[n].norm()))
    out = {
        "modules": len(deltas),
        "rank": rank,
        "load_s": t_load,
        "randomized_s": t_rand,
        "cartography_tool_s": t_tool,
        "dense_svd_all_s": t_dense,
        "speedup_randomized_vs_dense": t_dense / t_rand,
        "max_rel_err_top_sv": top_err,
        "max_rel_err_top_k_sv": k_err,
        "max_rel_err_energy": energy_err,
        "top10_same_set": set(cart["ranking"][:10]) == set(dense_rank[:10]),
        "captured_share_total": cart["totals"]["captured_share"],
        "min_captured_share": cart["totals"]["min_captured_share"],
    }
    try:
        ad = run_tool("cartography", adapter=DEMO_DONOR)["result"]
        a_cells = {c["name"]: c for c in ad["cells"]}
        diffs = [abs(c["share"] - a_cells[c["name"]]["share"]) for c in cart["cells"] if c["name"] in a_cells]
        rel_sv = [
            abs(c["top_sv"] - a_cells[c["name"]]["top_sv"]) / a_cells[c["name"]]["top_sv"]
            for c in cart["cells"]
            if c["name"] in a_cells
        ]
        out.update(
            {
                "adapter_vs_finetune_max_share_diff": max(diffs),
                "adapter_vs_finetune_max_rel_top_sv_diff": max(rel_sv),
                "adapter_vs_finetune_top10_same_set": set(ad["ranking"][:10]) == set(cart["ranking"][:10]),
                "kind_shares_finetune": cart["kind_shares"],
                "kind_shares_adapter": ad["kind_shares"],
            }
        )
    except Exception as exc:  # noqa: BLE001 - the comparison is optional
        out["adapter_comparison"] = f"skipped: {exc}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=20, help="repeats of the factored SVD (median)")
    ap.add_argument("--dense-repeat", type=int, default=3, help="repeats of the dense SVD (median)")
    ap.add_argument("--rank", type=int, default=16, help="randomized SVD rank for the SmolLM2 full fine-tune")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0 = torch's default); on a "
        "shared machine 1 gives stable numbers, as OpenMP spin-waiting on busy cores slows small ops",
    )
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    f = bench_factored(args.d, args.r, args.repeat, args.dense_repeat)
    print(f"\n1. spectrum of a rank-{f['r']} update, {f['d']} x {f['d']}")
    print(f"   {'method':34s} {'time':>12s} {'speed-up':>10s} {'max |dS|/S1':>12s}")
    print(
        f"   {'factored (QR + r x r SVD, f64)':34s} {f['factored_s'] * 1e3:9.3f} ms {'1x':>10s} "
        f"{f['factored_rel_err']:12.2e}"
    )
    print(
        f"   {'dense svdvals(B @ A), float32':34s} {f['dense_f32_s'] * 1e3:9.1f} ms "
        f"{f['speedup_vs_f32']:9.0f}x "
        f"{f['dense_f32_rel_err']:12.2e}"
    )
    print(
        f"   {'dense svdvals(B @ A), float64 (ref)':34s} {f['dense_f64_s'] * 1e3:9.1f} ms "
        f"{f['speedup_vs_f64']:9.0f}x "
        f"{0.0:12.2e}"
    )
    result = {"factored": f}
    if not args.skip_smollm2:
        s = bench_smollm2(args.rank)
        result["smollm2"] = s
        print("\n2. T5 on a full fine-tune: demo donor (merged) - SmolLM2-135M-Instruct")
        if "skipped" in s:
            print("   " + s["skipped"])
        else:
            print(
                f"   modules {s['modules']}, randomized rank {s['rank']} (models loaded in "
                f"{s['load_s']:.1f} s)"
            )
            print(f"   {'finetune_deltas (randomized SVD)':34s} {s['randomized_s']:9.2f} s")
            print(f"   {'whole cartography tool run':34s} {s['cartography_tool_s']:9.2f} s")
            print(
                f"   {'dense f64 svdvals of every dW':34s} {s['dense_svd_all_s']:9.2f} s   "
                f"({s['speedup_randomized_vs_dense']:.1f}x slower than randomized)"
            )
            print(
                f"   max relative error: top sv {s['max_rel_err_top_sv']:.2e}, top-{s['rank']} sv "
                f"{s['max_rel_err_top_k_sv']:.2e}, ||dW||_F {s['max_rel_err_energy']:.2e}; "
                f"top-10 modules same as dense: {s['top10_same_set']}"
            )
            print(
                f"   captured share of ||dW||^2 by the top {s['rank']}: total "
                f"{s['captured_share_total']:.6f}, "
                f"lowest module {s['min_captured_share']:.6f}"
            )
            if "adapter_vs_finetune_max_share_diff" in s:
                print(
                    "   adapter vs full fine-tune: max |share diff| "
                    f"{s['adapter_vs_finetune_max_share_diff']:.2e}, "
                    f"max rel top-sv diff {s['adapter_vs_finetune_max_rel_top_sv_diff']:.2e}, "
                    f"top-10 same: {s['adapter_vs_finetune_top10_same_set']}"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
