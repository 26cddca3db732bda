"""Pre-surgery diagnostics on Llama-shaped pairs too large to hold whole: T1-T4 streamed block by block.

Builds two random Llama-shaped models of its own (no hub download), weights written shard by shard
(one block per shard) in bfloat16, so the build never holds a model in memory:

* A: random weights (normal, std 0.02; norms 1), SmolLM2's tokenizer (run ``make prepare`` once);
* B: A in other coordinates: the residual stream permuted and sign-flipped by a seeded signed
  permutation P (an orthogonal map that bfloat16 stores exactly). Every matrix that reads the
  residual stream becomes ``W P``, every one that writes it ``P^T W``, the norms' gains are permuted.
  B computes what A computes, so the truth is known: T2's matching is the diagonal, T3's held-out
  residual is 0 at every layer, and T4's bridges are exact.

Then, in this one process, for the pair: the bare streamed passes of both models (read every block,
run the workload through it, keep nothing), and T1, T2, T3, T4 streamed (T2-T4 share one capture
per model, as in the app). It reports wall time, peak RSS (sampled every 20 ms per phase, and
the process's maximum), bytes read, and the ratio of the diagnostics to the bare passes. Before every
phase the pair's files are evicted from the page cache, so each phase reads from disk. Usage:

    python bench/scale.py --size 7b [--tokens 512] [--dir /tmp/graft-scale] [--dtype bfloat16]
                          [--max-memory 6GiB] [--keep] [--reuse] [--json out.json]
    python bench/scale.py --table out1.json out2.json ...     (a Markdown table of earlier results)
    python bench/scale.py --size 7b --lora [--json t5.json]   (T5 on a planted LoRA adapter, alone)
    python bench/scale.py --size 1b --tokens 4096 --stats streamed --tools cka,procrustes
                          (T2 and T3 keeping no rows: minibatch HSIC, pairs read in step)
    python bench/scale.py --size 1b --route dispatch --max-memory 3.5GiB
                          (T2-T4 on the pair placed by accelerate: CPU up to the budget, then disk)

Sizes: ``small`` (d 1,024, 8 blocks), ``1b`` (d 2,048, 16 blocks), ``7b`` (d 4,096, 32 blocks,
intermediate 11,008); all GQA with 8 KV heads. A 7B pair needs about 27 GB of disk; the build
takes a few minutes. The models are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import engine.tools  # noqa: E402, F401  (registers every tool)
from engine.core.data import load_workload  # noqa: E402
from engine.loading.builtins import SMOLLM2  # noqa: E402
from engine.loading.models import ModelSpec, ModelStore, model_folder  # noqa: E402
from engine.measure.capture_cache import CaptureCache, capture_model  # noqa: E402
from engine.running.runner import run_tool  # noqa: E402

SIZES = {
    "small": dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=2816, num_attention_heads=16),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=32),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32),
}
READS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # read the residual stream (in-features)
WRITES = ("o_proj", "down_proj")  # write it (out-features)


def config_for(size: str, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        **SIZES[size],
    )


def _write(folder: Path, shards: dict[str, dict[str, torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    weight_map = {}
    for fname, tensors in shards.items():
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    index = folder / "model.safetensors.index.json"
    old = json.loads(index.read_text())["weight_map"] if index.exists() else {}
    old.update(weight_map)
    total = sum(t.numel() * t.element_size() for s in shards.values() for t in s.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": old}, indent=1))


def signed_permutation(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(d, generator=g)
    signs = (torch.randint(0, 2, (d,), generator=g) * 2 - 1).to(torch.bfloat16)
    return perm, signs


def build_pair(size: str, root: Path, seed: int = 0, tokenizer: str = "") -> tuple[Path, Path, dict]:
    """A and its signed-permutation twin B, written block by block in bfloat16, with SmolLM2's
    tokenizer (or the one in folder ``tokenizer``: a machine without the built-in, such as a lent GPU)."""
    from transformers import AutoTokenizer

    tok_dir = tokenizer or model_folder(ModelSpec.parse(SMOLLM2))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = config_for(size, len(tok))
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    a, b = root / f"{size}-a", root / f"{size}-b"
    for f in (a, b):
        shutil.rmtree(f, ignore_errors=True)
        f.mkdir(parents=True)
        cfg.save_pretrained(f)
        tok.save_pretrained(f)
    perm, signs = signed_permutation(d, seed + 1)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def cols(W: torch.Tensor) -> torch.Tensor:  # W P: columns permuted, then signed
        return (W[:, perm] * signs).contiguous()

    def rows(W: torch.Tensor) -> torch.Tensor:  # P^T W: rows permuted, then signed
        return (W[perm] * signs[:, None]).contiguous()

    t0 = time.perf_counter()
    emb, head = rnd(cfg.vocab_size, d), rnd(cfg.vocab_size, d)
    norm = torch.ones(d, dtype=torch.bfloat16)
    outside_a = {"model.embed_tokens.weight": emb, "lm_head.weight": head, "model.norm.weight": norm}
    outside_b = {
        "model.embed_tokens.weight": cols(emb),
        "lm_head.weight": cols(head),
        "model.norm.weight": norm[perm].contiguous(),
    }
    _write(a, {"embeddings.safetensors": outside_a})
    _write(b, {"embeddings.safetensors": outside_b})
    del emb, head, outside_a, outside_b
    shapes = {
        "self_attn.q_proj": (d, d),
        "self_attn.k_proj": (kv, d),
        "self_attn.v_proj": (kv, d),
        "self_attn.o_proj": (d, d),
        "mlp.gate_proj": (cfg.intermediate_size, d),
        "mlp.up_proj": (cfg.intermediate_size, d),
        "mlp.down_proj": (d, cfg.intermediate_size),
    }
    for l in range(L):
        ta, tb = {}, {}
        for name, shape in shapes.items():
            W = rnd(*shape)
            key = f"model.layers.{l}.{name}.weight"
            ta[key] = W
            tb[key] = cols(W) if name.split(".")[1] in READS else rows(W)
        for n in ("input_layernorm", "post_attention_layernorm"):
            key = f"model.layers.{l}.{n}.weight"
            ta[key] = torch.ones(d, dtype=torch.bfloat16)
            tb[key] = ta[key][perm].contiguous()
        _write(a, {f"block-{l:03d}.safetensors": ta})
        _write(b, {f"block-{l:03d}.safetensors": tb})
        print(f"  built block {l + 1}/{L}", file=sys.stderr, flush=True)
    size_bytes = sum(f.stat().st_size for f in a.glob("*.safetensors"))
    return (
        a,
        b,
        {"build_s": round(time.perf_counter() - t0, 1), "model_bytes": size_bytes, "width": d, "layers": L},
    )


class PeakRSS:
    """Peak resident memory over a phase, sampled from /proc/self/status every 20 ms, and on a GPU
    the peak of torch's allocator (``gpu_peak``; None without one)."""

    def __enter__(self) -> "PeakRSS":
        self.gpu_peak = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.peak = self._now()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    @staticmethod
    def _now() -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._now())

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.gpu_peak = torch.cuda.max_memory_allocated()
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._now())


def drop_page_cache(*folders: Path) -> None:
    """Evict the folders' files from the page cache (posix_fadvise DONTNEED; no root needed for
    clean pages), so every phase reads its weights from disk: without it the phase run second finds
    part of the pair cached, and the ratio depends on the order of the phases."""
    for folder in folders:
        for f in folder.glob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def workload_texts() -> str:
    """The bundled data's texts, then README.md's paragraphs, as one plain-text workload file (one
    text per line): about 12,000 tokens, so budgets up to 8,192 are really reached."""
    texts = []
    for name in ("concept_set", "retained", "replay"):
        texts.extend(load_workload(str(ROOT / "data" / f"{name}.jsonl")).texts)
    texts += [
        p
        for p in (" ".join(p.split()) for p in (ROOT / "README.md").read_text().split("\n\n"))
        if len(p) >= 40
    ]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "graft-scale-workload.txt"
    path.write_text("\n".join(" ".join(t.split()) for t in texts) + "\n")
    return str(path)


ALL_TOOLS = ("compat", "cka", "procrustes", "bridge-check")


def run(
    size: str,
    root: Path,
    tokens: int,
    dtype: str,
    max_memory: str,
    keep: bool,
    reuse: bool,
    stats: str = "auto",
    tools_run: tuple = ALL_TOOLS,
    route: str = "on",
    device: str = "auto",
    tokenizer: str = "",
) -> dict:
    out: dict = {"size": size, "tokens": tokens, "dtype": dtype, "threads": torch.get_num_threads(),
                 "stats": stats, "route": "dispatch" if route == "dispatch" else "stream"}  # fmt: skip
    marker = root / f"{size}.built.json"
    if reuse and marker.is_file():
        a, b = root / f"{size}-a", root / f"{size}-b"
        info = json.loads(marker.read_text())
        print(f"reusing the {size} pair in {root}", file=sys.stderr, flush=True)
    else:
        print(f"building the {size} pair in {root}", file=sys.stderr, flush=True)
        a, b, info = build_pair(size, root, tokenizer=tokenizer)
        marker.write_text(json.dumps(info))
    out.update(info)
    workload = workload_texts()
    opts = {
        "workload": workload,
        "max_tokens": tokens,
        "dtype": dtype,
        "stream": route,
        "device": device,
        "max_memory": max_memory,
        "stats": stats,
    }
    store, cache = ModelStore(), CaptureCache()
    try:
        da, db = ModelSpec.parse(str(a)), ModelSpec.parse(str(b))
        # bare streamed passes: every block read and run over the workload, nothing kept
        ma = store.get(da, device, dtype, stream=True)
        mb = store.get(db, device, dtype, stream=True)
        out["device"] = str(ma.device)
        from engine.measure.budget import budget_texts

        texts = budget_texts(list(dict.fromkeys(load_workload(workload).texts)), [ma.tokenizer], tokens)
        # warm-up, untimed: the first pass of a process pays for kernel set-up (oneDNN's bfloat16
        # kernels), which would otherwise land on whichever phase runs first
        capture_model(ma, texts[:1], residual=False, batch_size=8)
        bare = {}
        for label, m in (("a", ma), ("b", mb)):
            m.stream.bytes_read, m.stream.read_seconds = 0, 0.0
            drop_page_cache(a, b)
            with PeakRSS() as p:
                capture_model(m, texts, residual=False, batch_size=8)
            bare[label] = {
                "read_seconds": round(m.stream.read_seconds, 2),
                "seconds": round(p.seconds, 2),
                "peak_rss": p.peak,
                "gpu_peak": p.gpu_peak,
                "bytes_read": m.stream.bytes_read,
            }
        out["bare"] = bare
        out["bare_s"] = round(bare["a"]["seconds"] + bare["b"]["seconds"], 2)
        tools = {}
        for tool in tools_run:
            ma.stream.bytes_read = mb.stream.bytes_read = 0
            drop_page_cache(a, b)
            with PeakRSS() as p:
                env = run_tool(tool, da, db, opts, store=store, captures=cache)
            r = env["result"]
            tools[tool] = {"seconds": round(p.seconds, 2), "peak_rss": p.peak, "gpu_peak": p.gpu_peak,
                           "bytes_read": ma.stream.bytes_read + mb.stream.bytes_read}  # fmt: skip
            tools[tool]["stats"] = env["meta"].get("stats", "rows")
            if "placement" in env["meta"]:  # --route dispatch: what accelerate put where
                tools[tool]["placement"] = {k: v["bytes"] for k, v in env["meta"]["placement"].items()}
            if tool in ("compat", "cka"):
                tools[tool]["plan"] = env["meta"].get("memory_plan")
            if tool == "cka":
                M = torch.tensor(r["matrix"])
                tools[tool]["diagonal_is_best"] = bool((M.argmax(1) == torch.arange(M.shape[0])).all())
                tools[tool]["min_diagonal"] = round(float(M.diagonal().min()), 6)
                tools[tool]["form"] = f"{r['estimator']} / {r['form']}"
            if tool == "procrustes":
                tools[tool].update(
                    mean_alignment=r["mean_alignment"],
                    estimator=r["estimator"],
                    n_fit=r["n_fit"],
                    max_residual_heldout=max(l["residual_heldout"] for l in r["layers"]),
                    tokens_needed=r["tokens_needed"],
                    warnings=r["warnings"],
                )
            if tool == "bridge-check":
                cb = torch.tensor(r["cos_bridged"])
                k = min(cb.shape)
                tools[tool].update(
                    n_fit=r["n_fit"],
                    min_cos_bridged_same_position=round(float(cb[range(k), range(k)].min()), 6),
                    mean_cos_raw_same_position=round(
                        float(torch.tensor(r["cos_raw"])[range(k), range(k)].mean()), 6
                    )
                    if r["cos_raw"] is not None
                    else None,
                )
        out["tools"] = tools
        out["diagnostics_s"] = round(sum(t["seconds"] for t in tools.values()), 2)
        out["ratio"] = round(out["diagnostics_s"] / out["bare_s"], 3)
        out["peak_rss"] = max(
            [t["peak_rss"] for t in tools.values()] + [v["peak_rss"] for v in bare.values()]
        )
        out["max_rss_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["bytes_read_diagnostics"] = sum(t["bytes_read"] for t in tools.values())
    finally:
        if not keep:
            shutil.rmtree(a, ignore_errors=True)
            shutil.rmtree(b, ignore_errors=True)
            marker.unlink(missing_ok=True)
    return out


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PLANTED_LAYERS = (10, 11, 12)  # where the planted adapter's update is 10x larger (mlp.down)


def build_lora(size: str, root: Path, rank: int = 16, seed: int = 7, targets: tuple = LORA_TARGETS) -> Path:
    """A PEFT LoRA adapter of this shape (every linear module of every block, rank ``rank``, float32
    factors), with a planted truth: mlp.down of blocks 10-12 gets a B ten times larger, so T5 must
    rank those three modules first."""
    from safetensors.torch import save_file

    cfg = config_for(size, 49152)
    d, L, ff = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    shapes = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
              "gate_proj": (ff, d), "up_proj": (ff, d), "down_proj": (d, ff)}  # fmt: skip
    out = root / f"{size}-lora"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for l in range(L):
        for name, (o, i) in shapes.items():
            if name not in targets:
                continue
            part = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{l}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, i, generator=g) / i**0.5
            big = 10.0 if name == "down_proj" and l in PLANTED_LAYERS else 1.0
            tensors[f"{key}.lora_B.weight"] = big * torch.randn(o, rank, generator=g) * 0.01
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
        "base_model_name_or_path": f"{size}-a", "fan_in_fan_out": False, "use_rslora": False,
    }, indent=1))  # fmt: skip
    return out


def run_lora(size: str, root: Path) -> dict:
    """T5 (concept cartography) on a LoRA adapter of this shape, alone (no base model is read)."""
    adapter = build_lora(size, root)
    try:
        with PeakRSS() as p:
            env = run_tool("cartography", adapter=str(adapter))
        r = env["result"]
        top = r["ranking"][:3]
        want = {f"blocks.{l}.mlp.down" for l in PLANTED_LAYERS}
        return {
            "size": size,
            "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
            "seconds": round(p.seconds, 2),
            "peak_rss": p.peak,
            "n_modules": len(r["cells"]),
            "top3": top,
            "planted_found": set(top) == want,
        }
    finally:
        shutil.rmtree(adapter, ignore_errors=True)


def table(files: list[str]) -> str:
    """A Markdown table of result files written by --json."""
    gib = 1024**3
    rows = [
        "| shape | d | blocks | tokens | weights per model | bare streamed passes, both | T1-T4 | ratio | "
        "T3 s | peak RSS in T1-T4 | read | plan's peak | T3 alignment (estimator) | T2 diagonal best |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for f in files:
        r = json.loads(Path(f).read_text())
        t = r["tools"]
        t3 = t["procrustes"]
        rows.append(
            f"| {r['size']} | {r['width']:,} | {r['layers']} | {r['tokens']:,} "
            f"| {r['model_bytes'] / gib:.2f} GiB "
            f"| {r['bare_s']:.1f} s | {r['diagnostics_s']:.1f} s | {r['ratio']:.2f} | {t3['seconds']:.1f} | "
            f"{r['peak_rss'] / gib:.2f} GiB | {r['bytes_read_diagnostics'] / gib:.1f} GiB | "
            f"{t['compat']['plan']['peak_bytes'] / gib:.2f} GiB | "
            f"{t3['mean_alignment']:.4f} ({t3['estimator']}, "
            f"n_fit {t3['n_fit']:,}) | {t['cka']['diagonal_is_best']} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument(
        "--dir", default="/tmp/graft-scale", help="where the pair is built (needs its size on disk)"
    )
    ap.add_argument("--max-memory", default="", help="the runs' --max-memory (empty: 85%% of what is free)")
    ap.add_argument("--keep", action="store_true", help="keep the built models")
    ap.add_argument("--reuse", action="store_true", help="reuse a pair kept by an earlier --keep run")
    ap.add_argument("--json", default="", help="write the result here too")
    ap.add_argument(
        "--table", nargs="+", default=None, metavar="JSON", help="print a Markdown table of results"
    )
    ap.add_argument("--lora", action="store_true", help="only T5 on a planted LoRA adapter of this shape")
    ap.add_argument("--stats", default="auto", choices=("auto", "rows", "streamed"), help="the runs' --stats")
    ap.add_argument("--tools", default=",".join(ALL_TOOLS), help="which of T1-T4 to run (comma-separated)")
    ap.add_argument("--device", default="auto", help="the runs' --device (auto: CUDA when present)")
    ap.add_argument(
        "--tokenizer", default="", help="a folder whose tokenizer the built pair takes (default SmolLM2's)"
    )
    ap.add_argument(
        "--route", default="on", choices=("on", "dispatch"),
        help="on: T1-T4 streamed block by block; dispatch: T2-T4 on the pair placed by accelerate within "
        "--max-memory (device, CPU, then disk), the bare passes streamed as the baseline",
    )  # fmt: skip
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.lora:
        res = run_lora(args.size, Path(args.dir))
        print(json.dumps(res, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return
    tools_run = tuple(t.strip() for t in args.tools.split(",") if t.strip())
    if not tools_run or set(tools_run) - set(ALL_TOOLS):
        ap.error(f"--tools: choose from {', '.join(ALL_TOOLS)}")
    if args.route == "dispatch" and "compat" in tools_run:
        tools_run = tuple(t for t in tools_run if t != "compat")  # T1 reads weights: it does not dispatch
    res = run(args.size, Path(args.dir), args.tokens, args.dtype, args.max_memory, args.keep, args.reuse,
              args.stats, tools_run, args.route, args.device, args.tokenizer)  # fmt: skip
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
