"""Organ transplantation (NOT, docs/methods.md operation 2) on SmolLM2-135M-Instruct: cost and the
paper's headline claims, measured with Graft's own tools and organ modules.

Everything runs on SmolLM2-135M-Instruct (L = 30 blocks) with the bundled concept set. The organ
is k = 3 blocks of SmolLM2 from s = floor(L/3) = 10 (``organ-extract``), trained standalone
(``organ-train``: frozen embeddings -> organ -> frozen norm + head) for ``--steps`` steps on the
concept **facts** (56 texts, written to a ``{"text"}`` JSONL; the same texts the LoRA trains on).

1. **Cost.** T9 (``position-sweep``) seconds per position, direct and closed-form bridged (from the
   tool's own progress messages: time between one position's start and the next); memory held by
   the inserted organ (``OrganInsertion.extra_bytes``: storages not shared with the cached SmolLM2)
   / the organ's bytes, aim <= 1.1; insert (materialise + apply) and median apply / rollback time
   over ``--repeat`` cycles; rollback bit-exact (``verify_rollback`` + weight hash after every cycle).
2. **Claims.** (a) direct vs bridged (paper: direct wins by 32-38 %): T9 over the same grid in both
   modes, relative perplexity gap ``(bridged - direct) / bridged``. (b) early positions best (paper:
   blocks 1 .. L/4): best position of the direct grid, mean perplexity of the positions in 1..L/4
   against the others, Spearman(position, perplexity). (c) checkpoint lossless: the organ extracted
   in memory vs the one saved and loaded by ``organ-extract``: bit-identical tensors, and inserted at
   the same position (``organ-insert`` from the checkpoint, ``OrganInsertion`` from memory, the
   evaluation cache cleared in between) identical perplexities and logits; for the trained organ,
   the standalone perplexity ``organ-train`` measured in memory against the one recomputed from the
   saved checkpoint. (d) organ vs LoRA, same data (the 56 facts), same step budget, batch 8, no
   replay for either: the organ's concept / retained perplexity once inserted (at the best direct
   T9 position, and at its own block s) against a ``make_donor`` LoRA (rank 8, its tuned lr 2e-3 with
   warm-up + cosine; the organ keeps ``organ-train``'s default lr 1e-3) on SmolLM2, both evaluated
   by the same ``evaluate_model`` (perplexity on the concept facts, on the retained set, graded
   score on the 13 held-out questions).

Usage (run it alone, under the CPU lock; about 10 minutes on one thread, ``--quick`` about 6)::

    python bench/organs.py [--steps 90] [--positions 1,3,5,7,10,14,20,27] [--repeat 5] [--quick] [--json
    out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine.tools  # noqa: E402, F401  (registers every tool: the registry never imports them)
from engine.core.progress import Progress, silent  # noqa: E402
from engine.evaluation.beforeafter import load_sets  # noqa: E402
from engine.evaluation.evalcache import clear_cache  # noqa: E402
from engine.loading.models import SMOLLM2, ModelSpec, ModelStore  # noqa: E402
from engine.running.organ_run import evaluate_insertion, evaluate_target, short, spearman  # noqa: E402
from engine.running.runner import run_tool  # noqa: E402
from engine.surgery.organ import default_start, extract_organ, load_organ  # noqa: E402
from engine.surgery.organ_surgery import OrganInsertion, Placement  # noqa: E402
from engine.surgery.organ_train import mean_loss, standalone_model  # noqa: E402

STEPS, QUICK_STEPS = 90, 20
GRID, QUICK_GRID = "1,3,5,7,10,14,20,27", "1,7,10,20"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def _rel(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``(a - b) / a``: how much lower b is than a, as a share of a."""
    return None if a is None or b is None or a == 0 else (a - b) / a


class PositionClock:
    """Progress sink that timestamps position-sweep's 'position P (i/n)' messages."""

    def __init__(self) -> None:
        self.starts: list[tuple[float, str]] = []

    def __call__(self, _fraction: float, message: str) -> None:
        if message.startswith("position ") and (not self.starts or self.starts[-1][1] != message):
            self.starts.append((time.perf_counter(), message))

    def seconds(self, t_end: float) -> list[float]:
        times = [t for t, _ in self.starts] + [t_end]
        return [b - a for a, b in zip(times, times[1:])]


def sweep(
    target: Any, store: ModelStore, organ_dir: str, workload: str, grid: str, mode: str
) -> dict[str, Any]:
    clock = PositionClock()
    t0 = time.perf_counter()
    out = run_tool(
        "position-sweep",
        target=target,
        organ=organ_dir,
        store=store,
        options={"workload": workload},
        params={
            "positions": grid,
            "strategy": "bridged-closed-form" if mode == "bridged" else "direct",
            "epsilon": True,
        },
        progress=Progress(clock),
    )
    t_end = time.perf_counter()
    per = clock.seconds(t_end)
    res = out["result"]
    return {
        "result": res,
        "wall_s": t_end - t0,
        "per_position_s": per,
        "median_position_s": statistics.median(per) if per else None,
    }


def memory_and_timing(
    target: Any, organ: Any, position: int, mode: str, texts: list[str], repeat: int
) -> dict[str, Any]:
    h_target = target.state_hash()
    ins = OrganInsertion(target, [Placement(organ, position, mode)])
    t0 = time.perf_counter()
    ins.apply()  # materialise (build the organ's blocks) + apply
    t_insert = time.perf_counter() - t0
    t_fit = None
    if mode == "bridged":
        t0 = time.perf_counter()
        ins.fit_bridges([target], texts)
        t_fit = time.perf_counter() - t0
    extra = ins.extra_bytes()
    swapped = ins.swapped_bytes
    applies, rollbacks, exact = [], [], True
    for _ in range(repeat):
        t0 = time.perf_counter()
        ins.rollback()
        rollbacks.append(time.perf_counter() - t0)
        exact &= ins.verify_rollback() and ins.weight_hash() == h_target
        t0 = time.perf_counter()
        ins.apply()
        applies.append(time.perf_counter() - t0)
    ins.rollback()
    exact &= ins.verify_rollback() and ins.weight_hash() == h_target and target.state_hash() == h_target
    return {
        "mode": mode,
        "position": position,
        "organ_bytes": organ.nbytes,
        "held_bytes": extra,
        "swapped_bytes": swapped,
        "held_over_organ": extra / organ.nbytes,
        "held_over_swapped": extra / swapped,
        "insert_s": t_insert,
        "bridge_fit_s": t_fit,
        "apply_ms_median": 1e3 * statistics.median(applies),
        "rollback_ms_median": 1e3 * statistics.median(rollbacks),
        "rollback_bit_exact": bool(exact),
        "cycles": repeat,
    }


def checkpoint_lossless(
    target: Any,
    store: ModelStore,
    ckpt: str,
    start: int,
    size: int,
    position: int,
    sets: Any,
    texts: list[str],
) -> dict[str, Any]:
    """Organ extracted in memory vs the saved + loaded checkpoint, both inserted at ``position``."""
    mem = extract_organ(target, start, size)
    disk = load_organ(ckpt)
    same = _equal_tensors(mem.tensors, disk.tensors)
    clear_cache()
    tool = run_tool(
        "organ-insert",
        target=target,
        organ=ckpt,
        store=store,
        params={"position": position, "strategy": "direct"},
    )
    after_tool = tool["result"]["after"]
    clear_cache()  # the in-memory insertion is evaluated afresh, not read from the cache
    logits = {}
    for name, organ in (("memory", mem), ("checkpoint", disk)):
        ins = OrganInsertion(target, [Placement(organ, position, "direct")])
        ins.apply()
        if name == "memory":
            after_mem = short(evaluate_insertion(ins, sets, "graded", 16, silent()))
        with torch.inference_mode():
            logits[name] = [
                ins.working(**target.tokenizer(t, return_tensors="pt").to(target.device)).logits
                for t in texts[:8]
            ]
        ins.rollback()
    return {
        "tensors_bit_identical": same,
        "position": position,
        "after_checkpoint_tool": after_tool,
        "after_memory": after_mem,
        "ppl_identical": after_tool == after_mem,
        "logits_max_abs_diff": max(
            float((a - b).abs().max()) for a, b in zip(logits["memory"], logits["checkpoint"])
        ),
        "tool_rollback_bit_exact": tool["result"]["rollback_bit_exact"],
        "tool_held_over_organ": tool["result"]["extra_bytes"] / tool["result"]["organ_bytes"],
        "tool_seconds_insert": tool["meta"].get("seconds_insert"),
        "tool_seconds_rollback": tool["meta"].get("seconds_rollback"),
    }


def train_lora(target: Any, store: ModelStore, sets: Any, out: Path, steps: int) -> dict[str, Any]:
    from engine.adapters.donor import make_donor

    t0 = time.perf_counter()
    with target.lock:
        card = make_donor(
            target.model,
            target.tokenizer,
            sets[0],
            out,
            steps=steps,
            replay=None,
            retained=sets[1],
            seed=0,
            base_name=SMOLLM2,
        )
    wall = time.perf_counter() - t0
    lora = store.get(ModelSpec.parse(str(out / "merged")), str(target.device), "float32")
    ev = short(evaluate_target(lora, sets, "graded", 16, silent()))
    hp = card["hyperparameters"]
    return {
        "eval": ev,
        "train_s": card["train_time_s"],
        "wall_s": wall,
        "loss_last": card["loss_curve"][-1],
        "card_facts_ppl": card["scores"]["after"]["facts_ppl"],
        "card_retained_ppl": card["scores"]["after"]["retained_ppl"],
        "config": {
            k: hp[k]
            for k in (
                "steps",
                "rank",
                "alpha",
                "lr",
                "batch_size",
                "replay_fraction",
                "n_trainable_params",
                "schedule",
            )
        },
    }


def claims(direct: dict, bridged: dict, L: int) -> dict[str, Any]:
    d_pts = {p["position"]: p for p in direct["result"]["points"]}
    b_pts = {p["position"]: p for p in bridged["result"]["points"]}
    rows = []
    for p in sorted(d_pts):
        d, b = d_pts[p], b_pts.get(p, {})
        rows.append(
            {
                "position": p,
                "direct_concept": d["ppl_concept"],
                "bridged_concept": b.get("ppl_concept"),
                "direct_retained": d["ppl_retained"],
                "bridged_retained": b.get("ppl_retained"),
                "direct_gain_concept": _rel(b.get("ppl_concept"), d["ppl_concept"]),
                "direct_gain_retained": _rel(b.get("ppl_retained"), d["ppl_retained"]),
                "epsilon": d["epsilon"],
            }
        )
    gains = [r["direct_gain_concept"] for r in rows if r["direct_gain_concept"] is not None]
    wins = sum(g > 0 for g in gains)
    ratios = [x for x in (_ratio(r["direct_concept"], r["bridged_concept"]) for r in rows) if x is not None]
    best_d, best_b = direct["result"]["best"], bridged["result"]["best"]
    early = [
        r["direct_concept"] for r in rows if 1 <= r["position"] <= L // 4 and r["direct_concept"] is not None
    ]
    late = [
        r["direct_concept"]
        for r in rows
        if not 1 <= r["position"] <= L // 4 and r["direct_concept"] is not None
    ]
    return {
        "rows": rows,
        "a": {
            "direct_wins_positions": wins,
            "positions": len(gains),
            "median_direct_gain_concept": statistics.median(gains) if gains else None,
            "median_ratio_concept": statistics.median(ratios) if ratios else None,
            "best_direct": best_d,
            "best_bridged": best_b,
            "best_vs_best_gain": _rel(best_b and best_b["ppl_concept"], best_d and best_d["ppl_concept"]),
        },
        "b": {
            "early_range": [1, L // 4],
            "best_position": best_d and best_d["position"],
            "best_in_early_range": bool(best_d) and 1 <= best_d["position"] <= L // 4,
            "mean_early": statistics.fmean(early) if early else None,
            "mean_other": statistics.fmean(late) if late else None,
            "spearman_position_ppl": spearman(
                [r["position"] for r in rows], [r["direct_concept"] for r in rows]
            ),
            "spearman_epsilon_ppl": direct["result"]["spearman_concept"],
        },
    }


def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-2) else f"{x:.{nd}f}"
    return str(x)


def table(out: dict[str, Any]) -> str:
    c, L = out["claims"], out["setup"]["n_layers"]
    lines = ["| measure | value |", "|---|---|"]
    add = lambda k, v: lines.append(f"| {k} | {v} |")  # noqa: E731
    s = out["setup"]
    add(
        "setup",
        f"SmolLM2-135M-Instruct, L = {L}, organ = blocks {s['organ_layers']} (k = {s['k']}), "
        f"{s['steps']} steps, {s['threads']} torch thread(s), device {s['device']}",
    )
    add(
        "T (no organ): concept / retained ppl, graded",
        f"{_f(s['baseline']['ppl_concept'])} / {_f(s['baseline']['ppl_retained'])}, "
        f"{_f(s['baseline']['task_score'], 3)}",
    )
    for mode in ("direct", "bridged"):
        sw = out["t9"][mode]
        add(
            f"T9 {mode}: s / position (median; {len(sw['per_position_s'])} positions; whole run)",
            f"{_f(sw['median_position_s'])} s; {_f(sw['wall_s'], 1)} s",
        )
    for m in out["memory"]:
        add(
            f"{m['mode']} at p={m['position']}: held / organ bytes (held / swapped)",
            f"{_f(m['held_over_organ'], 4)} ({_f(m['held_over_swapped'], 4)}); organ "
            f"{m['organ_bytes'] / 2**20:.1f} MiB",
        )
        add(
            f"{m['mode']}: insert s (bridge fit s); apply / rollback ms median of {m['cycles']}",
            f"{_f(m['insert_s'], 3)} ({_f(m['bridge_fit_s'], 2)}); {_f(m['apply_ms_median'], 3)} / "
            f"{_f(m['rollback_ms_median'], 3)}",
        )
        add(f"{m['mode']}: rollback bit-exact (every cycle)", _f(m["rollback_bit_exact"]))
    for r in c["rows"]:
        add(
            f"p={r['position']}: concept ppl direct / bridged (ratio); retained direct / bridged; T4 eps",
            f"{_f(r['direct_concept'])} / {_f(r['bridged_concept'])} "
            f"({_f(_ratio(r['direct_concept'], r['bridged_concept']), 3)}); "
            f"{_f(r['direct_retained'])} / {_f(r['bridged_retained'])}; {_f(r['epsilon'], 3)}",
        )
    a, b = c["a"], c["b"]
    add(
        "(a) direct beats bridged (concept ppl) at",
        f"{a['direct_wins_positions']}/{a['positions']} positions; median direct / bridged "
        f"ratio {_f(a['median_ratio_concept'], 3)} (paper, Table 10: direct / bridged perplexity "
        "0.72-0.76, e.g. 31.30 / 41.48; its 32-38 % is the gap relative to direct)",
    )
    add(
        "(a) best direct vs best bridged",
        f"p={a['best_direct']['position']}: {_f(a['best_direct']['ppl_concept'])} vs "
        f"p={a['best_bridged']['position']}: {_f(a['best_bridged']['ppl_concept'])} (gain "
        f"{_f(a['best_vs_best_gain'] and 100 * a['best_vs_best_gain'], 1)} %)",
    )
    add(
        f"(b) best direct position in 1..{L // 4} (paper: early best)",
        f"{_f(b['best_in_early_range'])} (best p = {b['best_position']})",
    )
    add(
        f"(b) mean concept ppl, p in 1..{L // 4} vs others", f"{_f(b['mean_early'])} vs {_f(b['mean_other'])}"
    )
    add(
        "(b) Spearman(position, ppl); Spearman(T4 eps, ppl)",
        f"{_f(b['spearman_position_ppl'], 3)}; {_f(b['spearman_epsilon_ppl'], 3)}",
    )
    ck = out["checkpoint"]
    add("(c) extract -> save -> load: tensors bit-identical", _f(ck["tensors_bit_identical"]))
    add(
        f"(c) inserted at p={ck['position']}: ppl identical (checkpoint via organ-insert vs memory)",
        f"{_f(ck['ppl_identical'])}: {_f(ck['after_checkpoint_tool']['ppl_concept'], 6)} vs "
        f"{_f(ck['after_memory']['ppl_concept'], 6)}; "
        f"max |logit diff| {_f(ck['logits_max_abs_diff'])}",
    )
    add(
        "(c) trained organ: standalone ppl in memory vs reloaded",
        f"{_f(ck['trained_identical'])}: "
        f"{_f(ck['trained_ppl_memory'], 6)} vs {_f(ck['trained_ppl_reloaded'], 6)}",
    )
    add(
        "(c) organ-insert tool: rollback bit-exact; held / organ",
        f"{_f(ck['tool_rollback_bit_exact'])}; {_f(ck['tool_held_over_organ'], 4)}",
    )
    d = out["organ_vs_lora"]
    add(
        "(d) organ standalone training: s; standalone ppl before -> after",
        f"{_f(d['organ_train_s'], 1)}; "
        f"{_f(d['organ_standalone_ppl_before'])} -> {_f(d['organ_standalone_ppl_after'])}",
    )
    for key, label in (
        ("organ_best", "organ inserted at best direct p"),
        ("organ_own", "organ inserted at its own s"),
        ("lora", "LoRA (make_donor)"),
    ):
        e = d[key]
        add(
            f"(d) {label}{'' if key == 'lora' else ' = ' + str(e['position'])}: concept / retained ppl, "
            "graded",
            f"{_f(e['ppl_concept'])} / {_f(e['ppl_retained'])}, {_f(e['task_score'], 3)}",
        )
    add(
        "(d) LoRA: train s; card facts / retained ppl",
        f"{_f(d['lora_train_s'], 1)}; {_f(d['lora_card_facts_ppl'])} / {_f(d['lora_card_retained_ppl'])}",
    )
    add(
        "(d) concept ppl LoRA / organ (paper: about 10, the organ an order of magnitude lower)",
        f"{_f(d['lora_over_organ_concept'], 3)} (best p), {_f(d['lora_over_organ_concept_own'], 3)} (own s)",
    )
    add("(d) retained ppl LoRA / organ", f"{_f(d['lora_over_organ_retained'], 3)} (best p)")
    add("wall time", f"{_f(out['wall_s'], 1)} s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--steps",
        type=int,
        default=0,
        help=f"step budget of both the organ and the LoRA (default {STEPS}, --quick {QUICK_STEPS})",
    )
    ap.add_argument("--positions", default="", help=f"T9 grid (default {GRID}, --quick {QUICK_GRID})")
    ap.add_argument("--repeat", type=int, default=5, help="apply / rollback cycles (median)")
    ap.add_argument("--quick", action="store_true", help="fewer steps and positions (about 6 minutes)")
    ap.add_argument("--skip-lora", action="store_true", help="skip the LoRA of claim (d) (the longest part)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--work",
        default="",
        help="folder for organs, the LoRA and the facts file (default: a temp dir, removed)",
    )
    ap.add_argument("--json", default="", help="write every number here")
    args = ap.parse_args()
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    grid = args.positions or (QUICK_GRID if args.quick else GRID)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="graft-bench-organs-")
    work = Path(args.work or tmp.name).resolve()  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    store = ModelStore()
    target = store.get(ModelSpec.parse(SMOLLM2), args.device, "float32")
    L, k = target.arch.n_layers, 3
    s = default_start(L)
    sets = load_sets("", "")
    facts = list(sets[0].facts)
    facts_path = work / "concept_facts.jsonl"
    facts_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in facts))
    _log("baseline evaluation of T")
    baseline = short(evaluate_target(target, sets, "graded", 16, silent()))

    _log(f"organ-extract blocks {s}..{s + k - 1}")
    ext = run_tool(
        "organ-extract", donor=target, store=store, params={"start": s, "size": k, "out": str(work / "organ")}
    )
    _log(f"organ-train {steps} steps on {len(facts)} facts")
    t0 = time.perf_counter()
    tr = run_tool(
        "organ-train",
        organ=str(work / "organ"),
        store=store,
        # this bench's protocol: a step budget at constant-ish Adam-like lr 1e-3 (no decay, no warm-up)
        params={
            "concept": str(facts_path),
            "steps": steps,
            "lr": 1e-3,
            "weight_decay": 0.0,
            "warmup": 0.0,
            "out": str(work / "organ-trained"),
        },  # fmt: skip
    )
    t_train = time.perf_counter() - t0
    trained_dir = tr["result"]["path"]
    trained = load_organ(trained_dir)
    model, _ = standalone_model(target, trained)
    reloaded_ppl = math.exp(mean_loss(model, target.tokenizer, facts))  # as organ-train's card computes it
    del model

    _log("(c) checkpoint round trip")
    ck = checkpoint_lossless(target, store, str(work / "organ"), s, k, s + k, sets, facts)
    ck.update(
        extract_bit_exact_reload=ext["result"]["bit_exact_reload"],
        trained_ppl_memory=tr["result"]["metrics"]["standalone_ppl_after"],
        trained_ppl_reloaded=reloaded_ppl,
    )
    ck["trained_identical"] = ck["trained_ppl_memory"] == reloaded_ppl

    t9 = {}
    for mode in ("direct", "bridged"):
        _log(f"T9 {mode} over {grid}")
        t9[mode] = sweep(target, store, trained_dir, str(facts_path), grid, mode)
    cl = claims(t9["direct"], t9["bridged"], L)

    _log("memory, insert and rollback")
    best_p = cl["a"]["best_direct"]["position"]
    memory = [
        memory_and_timing(target, trained, best_p, mode, facts, args.repeat) for mode in ("direct", "bridged")
    ]

    _log(f"organ at its own block s = {s}")
    ins = OrganInsertion(target, [Placement(trained, s, "direct")])
    ins.apply()
    organ_own = {"position": s, **short(evaluate_insertion(ins, sets, "graded", 16, silent()))}
    ins.rollback()
    point = next(p for p in t9["direct"]["result"]["points"] if p["position"] == best_p)
    organ_best = {
        "position": best_p,
        **{key: point[key] for key in ("ppl_concept", "ppl_retained", "task_score")},
    }
    d: dict[str, Any] = {
        "organ_train_s": t_train,
        "organ_best": organ_best,
        "organ_own": organ_own,
        "organ_standalone_ppl_before": tr["result"]["metrics"]["standalone_ppl_before"],
        "organ_standalone_ppl_after": tr["result"]["metrics"]["standalone_ppl_after"],
        "organ_lr": 1e-3,
        "data": f"{len(facts)} concept facts, batch 8, no replay",
    }
    if args.skip_lora:
        d.update(
            lora={"ppl_concept": None, "ppl_retained": None, "task_score": None},
            lora_train_s=None,
            lora_card_facts_ppl=None,
            lora_card_retained_ppl=None,
        )
    else:
        _log(f"LoRA (make_donor) {steps} steps, no replay")
        lo = train_lora(target, store, sets, work / "lora", steps)
        d.update(
            lora=lo["eval"],
            lora_train_s=lo["train_s"],
            lora_wall_s=lo["wall_s"],
            lora_config=lo["config"],
            lora_card_facts_ppl=lo["card_facts_ppl"],
            lora_card_retained_ppl=lo["card_retained_ppl"],
        )
    d["lora_over_organ_concept"] = _ratio(d["lora"]["ppl_concept"], organ_best["ppl_concept"])
    d["lora_over_organ_concept_own"] = _ratio(d["lora"]["ppl_concept"], organ_own["ppl_concept"])
    d["lora_over_organ_retained"] = _ratio(d["lora"]["ppl_retained"], organ_best["ppl_retained"])

    out = {
        "setup": {
            "model": SMOLLM2,
            "n_layers": L,
            "k": k,
            "organ_layers": list(range(s, s + k)),
            "steps": steps,
            "grid": grid,
            "threads": torch.get_num_threads(),
            "device": str(target.device),
            "baseline": baseline,
            "torch": torch.__version__,
        },
        "t9": t9,
        "memory": memory,
        "checkpoint": ck,
        "claims": cl,
        "organ_vs_lora": d,
        "wall_s": time.perf_counter() - t_start,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    print(table(out))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
