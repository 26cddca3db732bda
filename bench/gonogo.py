"""Does the go / no-go predict the outcome? Predicted vs measured, per pair.

For each pair: run ``go-no-go`` (T1-T4, T7), read its module-swap line (go with K, or no-go with the
reason), then run the swap through ``run_tool("swap", ...)`` at the recommended K (at ``--k-nogo``
where the line is no-go, to see what the advice saved you from) and measure Recovery (graded score)
and the relative change of retained perplexity. The prediction held when:

* go: the swap ran, did not raise retained perplexity by more than ``--max-increase``, and
  Recovery > 0 (Recovery is undefined when donor and target score the same; then "n/a");
* no-go: the swap was refused, or it raised retained perplexity by more than ``--max-increase``,
  or moved nothing (Recovery <= 0).

Pairs (``--pairs``): ``self`` (tiny-llama-a into itself), ``planted`` (tiny-llama-a with two
modules perturbed, into tiny-llama-a), ``twin`` (tiny-llama-a into its rotated twin), ``cross``
(tiny-gpt2-a into tiny-llama-b), ``unrelated`` (tiny-gpt2-a into tiny-gpt2-b), ``demo`` (the demo
donor into SmolLM2-135M-Instruct; it must be built). Usage:

    python bench/gonogo.py [--pairs self,planted,twin,cross,unrelated] [--k-nogo 8] [--json out.json]
    python bench/gonogo.py --pairs self,twin,cross,unrelated,demo --ray auto   # a pair per Ray worker

With ``--ray`` (``auto`` or a cluster's ``host:port``) each pair is a cell on a Ray worker
(docs/cli.md, "Sweeps on Ray"), which builds the pair from its name, as here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine.tools  # noqa: E402, F401  (registers every tool: the registry never imports them)
from engine.core.errors import GraftError  # noqa: E402
from engine.core.params import RunOptions  # noqa: E402
from engine.core.progress import Progress  # noqa: E402
from engine.loading.arch import ArchAdapter  # noqa: E402
from engine.loading.models import DEMO_DONOR, SMOLLM2, LoadedModel, ModelSpec  # noqa: E402
from engine.loading.tiny import build_tiny  # noqa: E402
from engine.running.cells import run_cells  # noqa: E402
from engine.running.context import ToolContext  # noqa: E402
from engine.running.runner import run_tool  # noqa: E402
from engine.surgery.twin import rotate_model  # noqa: E402

TINY = ("self", "planted", "twin", "cross", "unrelated")


def _loaded(model: Any, tok: Any, name: str) -> LoadedModel:
    return LoadedModel(
        ModelSpec("builtin", name), model, tok, ArchAdapter(model), torch.device("cpu"), torch.float32, ""
    )


def pair(name: str) -> tuple[Any, Any]:
    if name == "self":
        return ModelSpec.parse("tiny-llama-a"), ModelSpec.parse("tiny-llama-a")
    if name == "cross":
        return ModelSpec.parse("tiny-gpt2-a"), ModelSpec.parse("tiny-llama-b")
    if name == "unrelated":
        return ModelSpec.parse("tiny-gpt2-a"), ModelSpec.parse("tiny-gpt2-b")
    if name == "demo":
        return ModelSpec.parse(DEMO_DONOR), ModelSpec.parse(SMOLLM2)
    base = _loaded(*build_tiny("tiny-llama-a"), "tiny-llama-a")
    if name == "twin":
        return base, _loaded(rotate_model(base.model, seed=7)[0], base.tokenizer, "tiny-llama-a-twin")
    if name == "planted":  # the same two modules as tests/test_gonogo.py
        model, tok = build_tiny("tiny-llama-a")
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for mod in ("model.layers.2.mlp.down_proj", "model.layers.3.self_attn.o_proj"):
                w = model.get_submodule(mod).weight
                w.add_(torch.randn(w.shape, generator=gen) * w.std() * 3)
        return _loaded(model, tok, "tiny-llama-a-planted"), base
    raise SystemExit(f"unknown pair {name!r}: choose from {', '.join(TINY + ('demo',))}")


def measure(name: str, k_nogo: int, max_increase: float, device: str) -> dict[str, Any]:
    d, t = pair(name)
    opts = {"device": device}
    t0 = time.perf_counter()
    g = run_tool("go-no-go", d, t, options=opts)["result"]
    t_gonogo = time.perf_counter() - t0
    swap = next(o for o in g["operations"] if o["operation"] == "module_swap")
    k = swap["settings"].get("k") if swap["go"] else k_nogo
    row: dict[str, Any] = {
        "pair": name,
        "donor": getattr(d, "ref", None) or d.spec.ref,
        "target": getattr(t, "ref", None) or t.spec.ref,
        "predicted": swap["verdict"],
        "k": k,
        "reason": swap["reasons"][0] if swap["reasons"] else "",
        "viable": g["viable"],
        "gonogo_seconds": round(t_gonogo, 2),
    }
    t1 = time.perf_counter()
    try:
        r = run_tool("swap", d, t, options=opts, params={"k": k})["result"]
    except GraftError as exc:
        row.update(
            measured="refused",
            refusal=str(exc),
            recovery=None,
            retained_change=None,
            held=not swap["go"],
            swap_seconds=round(time.perf_counter() - t1, 2),
        )
        return row
    before, after = r["before"]["ppl_retained"], r["after"]["ppl_retained"]
    change = after / before - 1.0 if before else None
    rec = r["recovery"]
    gap = (r["donor"]["task_score"] or 0.0) - (r["before"]["task_score"] or 0.0)
    if (
        rec is not None and abs(gap) < 1e-6
    ):  # D and T score the same up to rounding: Recovery is noise / noise
        rec, r["recovery_note"] = None, f"S(D) - S(T) = {gap:.1e}: Recovery is not meaningful"
    worse = change is not None and change > max_increase
    if swap["go"]:
        held = (not worse) and (rec is None or rec > 0)
        held_text = "n/a (Recovery undefined)" if rec is None and not worse else held
    else:
        held = worse or (rec is not None and rec <= 0)
        held_text = held
    row.update(
        measured="ran",
        recovery=rec,
        recovery_note=r.get("recovery_note") or "",
        retained_change=change,
        ppl_retained_before=before,
        ppl_retained_after=after,
        held=held_text,
        swap_seconds=round(time.perf_counter() - t1, 2),
    )
    return row


def pair_cell(ctx: Any, shared: dict[str, Any], cell: dict[str, Any], progress: Any) -> dict[str, Any]:
    """One pair of the grid (in process, or on a Ray worker)."""
    return measure(cell["pair"], shared["k_nogo"], shared["max_increase"], shared["device"])


def _pair(cell: dict[str, Any]) -> str:
    return f"pair {cell['pair']}"


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:+.1%}" if abs(v) < 10 else f"{v:+.3g}"
    return str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default=",".join(TINY))
    ap.add_argument("--k-nogo", type=int, default=8, help="K swapped where the advice is no-go (default 8)")
    ap.add_argument(
        "--max-increase", type=float, default=0.1, help="retained perplexity rise that counts as damage"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ray", default="", help="a pair per Ray worker: auto or host:port")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    shared = {"k_nogo": args.k_nogo, "max_increase": args.max_increase, "device": args.device}
    cells = [{"pair": p.strip()} for p in args.pairs.split(",") if p.strip()]
    # The tool's name lets a Ray worker rebuild a context; the models come from each pair's name.
    ctx = ToolContext(None, None, None, RunOptions(ray=args.ray), tool="go-no-go")
    run = run_cells(ctx, pair_cell, shared, cells, Progress(lambda f, m: print(m, file=sys.stderr)), _pair)
    failed = [run.failed[i] for i in sorted(run.failed)]
    rows = [r for r in run.results if r is not None]
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)
    print(
        "| pair | predicted swap | K | measured | Recovery (graded) | retained ppl change | held | "
        "go/no-go s | swap s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        rec = "—" if r["recovery"] is None else f"{r['recovery']:.3f}"
        print(
            f"| {r['pair']} ({r['donor']} → {r['target']}) | {r['predicted']} | {r['k']} | {r['measured']} "
            f"| {rec} | "
            f"{_fmt(r['retained_change'])} | {r['held']} | {r['gonogo_seconds']} | {r['swap_seconds']} |"
        )
    for r in rows:
        print(
            f"- {r['pair']}: {r['reason']}"
            + (f" (swap refused: {r['refusal']})" if r.get("refusal") else "")
            + f"; viable: {', '.join(r['viable']) or 'none'}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, allow_nan=False))


if __name__ == "__main__":
    # Ray workers import the cell function by module name: run this file as the module ``gonogo``
    # (bench/ is on the import path), not as ``__main__``.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gonogo

    gonogo.main()
