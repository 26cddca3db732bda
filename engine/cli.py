"""Headless CLI: ``python -m engine <tool> --donor SPEC --target SPEC ... --json out.json``.

Every registered tool is a sub-command with the same compute path as the UI (``run_tool``), and
its parameters come from the tool's typed params with their help text. Errors caused by the
input print one line on stderr and exit 2; nothing is written unless the run succeeds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import Cancelled, GraftError
from .params import ParamSpec, RunOptions, param_specs
from .progress import Progress


class _Bar:
    """Progress on stderr: a redrawn line on a terminal, a line per 10% otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = -1

    def __call__(self, fraction: float, message: str) -> None:
        if self.quiet:
            return
        pct = int(fraction * 100)
        if self.tty:
            sys.stderr.write(f"\r[{pct:3d}%] {message[:70]:<70}")
            sys.stderr.flush()
        elif pct // 10 != self.last // 10:
            sys.stderr.write(f"[{pct:3d}%] {message}\n")
        self.last = pct

    def close(self) -> None:
        if self.tty and not self.quiet:
            sys.stderr.write("\n")


def _add_spec(p: argparse.ArgumentParser, s: ParamSpec, dest_prefix: str = "") -> None:
    kw: dict[str, Any] = {"dest": dest_prefix + s.name, "default": None, "help": f"{s.help} (default: {s.default})"}
    if s.type is bool:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = str  # validated by build_params, so errors are one clean line
        kw["metavar"] = s.type.__name__.upper()
        if s.choices:
            kw["help"] += f" [{'|'.join(map(str, s.choices))}]"
    p.add_argument(s.flag, **kw)


def _write_json(path: str, payload: dict[str, Any]) -> None:
    """Write atomically: a failed run never clobbers an existing file."""
    out = Path(path).expanduser()
    if out.parent and not out.parent.exists():
        raise GraftError(f"folder does not exist: {out.parent}")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out)


def build_parser() -> argparse.ArgumentParser:
    from .registry import all_tools

    parser = argparse.ArgumentParser(prog="python -m engine", description="Graft: pre-surgery diagnostics and transplants, headless.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for tool in all_tools():
        p = sub.add_parser(tool.name, help=f"{tool.code} {tool.title}", description=f"{tool.code} {tool.title}: {tool.summary}")
        p.add_argument("--donor", required=True, help="donor model: built-in name, HF folder, .gguf file or cached hub id")
        p.add_argument("--target", required=True, help="target model (same forms as --donor)")
        for s in param_specs(RunOptions):
            _add_spec(p, s, "opt_")
        for s in param_specs(tool.params_cls):
            _add_spec(p, s, "param_")
        p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
        p.add_argument("--json", dest="json_path", help="write the result envelope here")
        p.add_argument("--quiet", action="store_true", help="no progress on stderr")
        p.set_defaults(tool=tool.name)

    d = sub.add_parser("make-donor", help="LoRA fine-tune a base model on a concept file (the donor)")
    d.add_argument("--base", required=True, help="base model spec")
    d.add_argument("--concept", required=True, help="concept set JSONL (facts + qa)")
    d.add_argument("--out", required=True, help="output folder (merged/, adapter/, card.json)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the engine's tuned default)")
    d.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8)")
    d.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the engine's tuned default)")
    rp = d.add_mutually_exclusive_group()
    rp.add_argument("--replay", metavar="FILE", default=None,
                    help="general text (concept-set JSONL) mixed into training against forgetting "
                         "(default: the bundled data/replay.jsonl)")
    rp.add_argument("--no-replay", action="store_true", help="train on the concept facts only")
    d.add_argument("--replay-fraction", type=float, default=None,
                   help="share of each batch drawn from the replay set, in [0, 1) (default: the engine's tuned default)")
    d.add_argument("--retained", metavar="FILE", default=None,
                   help="held-out general text whose perplexity before/after goes on the card "
                        "(default: the bundled data/retained.jsonl)")
    d.add_argument("--seed", type=int, default=0, help="seed (training is deterministic for a seed)")
    d.add_argument("--device", default="auto", help="auto, cpu or cuda")
    d.add_argument("--json", dest="json_path", help="write the donor card here too")
    d.add_argument("--quiet", action="store_true")

    pr = sub.add_parser("prepare", help="dequantise SmolLM2 once and build the demo donor (cached)")
    pr.add_argument("--no-donor", action="store_true", help="only prepare SmolLM2")
    pr.add_argument("--gemma", action="store_true", help="also prepare gemma3-270m (needs the optional packages)")
    pr.add_argument("--quiet", action="store_true")

    sub.add_parser("list-models", help="built-in models and their state")
    return parser


def _run(args: argparse.Namespace) -> int:
    from .context import run_tool
    from .history import History
    from .models import ModelSpec
    from .params import build_params
    from .registry import get_tool

    bar = _Bar(getattr(args, "quiet", False))
    try:
        if args.command == "list-models":
            from .models import builtin_status

            for name, st in builtin_status().items():
                print(f"{name:34s} {st['state']:16s} {st['description']}")
            return 0
        if args.command == "prepare":
            from .actions import prepare_builtins
            from .models import prepare_gemma3

            out = prepare_builtins(with_donor=not args.no_donor, progress=Progress(bar))
            if args.gemma:
                out["gemma3-270m"] = str(prepare_gemma3(Progress(bar)))
            bar.close()
            for k, v in out.items():
                print(f"{k}: {v}")
            return 0
        if args.command == "make-donor":
            from .actions import BUNDLED, build_donor

            replay = None if args.no_replay else (args.replay or BUNDLED)
            res = build_donor(ModelSpec.parse(args.base), args.concept, args.out, steps=args.steps, rank=args.rank,
                              lr=args.lr, replay=replay, replay_fraction=args.replay_fraction,
                              retained=args.retained or BUNDLED, seed=args.seed, device=args.device,
                              progress=Progress(bar))
            bar.close()
            # The card as written to card.json: without the in-memory model (not JSON).
            card = {k: v for k, v in res["card"].items() if k != "model"}
            if args.json_path:
                _write_json(args.json_path, {"out_dir": res["out_dir"], "card": card})
            print(json.dumps({k: card[k] for k in card if k not in ("loss_curve", "evaluation")}, indent=2, default=str)[:4000])
            return 0
        tool = get_tool(args.tool)
        options = build_params(RunOptions, {s.name: getattr(args, "opt_" + s.name) for s in param_specs(RunOptions)
                                            if getattr(args, "opt_" + s.name) is not None})
        params = build_params(tool.params_cls, {s.name: getattr(args, "param_" + s.name) for s in param_specs(tool.params_cls)
                                                if getattr(args, "param_" + s.name) is not None})
        donor = ModelSpec.parse(args.donor, args.trust_remote_code)
        target = ModelSpec.parse(args.target, args.trust_remote_code)
        if args.json_path:
            parent = Path(args.json_path).expanduser().parent
            if not parent.exists():
                raise GraftError(f"folder does not exist: {parent}")
        history = History()
        run_id = f"cli-{int(time.time() * 1000):x}"
        history.create(run_id, tool.name, f"{tool.code} {tool.title}", donor.ref, target.ref,
                       {"options": dataclasses.asdict(options), "params": dataclasses.asdict(params)}, source="cli")
        history.start(run_id)
        try:
            env = run_tool(tool.name, donor, target, options, params, progress=Progress(bar))
        except BaseException as exc:
            history.finish(run_id, "failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        history.finish(run_id, "done", result=env)
        bar.close()
        if args.json_path:
            _write_json(args.json_path, env)
        else:
            print(json.dumps(env["result"], indent=2)[:20000])
        return 0
    except GraftError as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Cancelled:
        print("error: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress line replaces the loaders' bars
    hf_logging.set_verbosity_error()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if os.environ.get("GRAFT_DEBUG"):
        return _run(args)
    try:
        return _run(args)
    except Exception as exc:  # a bug: still one line, with a hint how to see the traceback
        print(f"error: internal: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (GRAFT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
