"""Headless CLI: ``python -m engine <tool> --donor SPEC --target SPEC ... --json out.json``.

Every registered tool is a sub-command with the same compute path as the UI (``run_tool``), and
its parameters come from the tool's typed params with their help text. Errors caused by the
input print one line on stderr and exit 2; nothing is written unless the run succeeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Optional, Sequence

from .core import jsonsafe
from .core.errors import Cancelled, GraftError, printable_line
from .core.outputs import check_output_file, write_text_atomic
from .core.params import WORKLOAD_OPTIONS, ParamSpec, RunOptions, param_specs
from .core.progress import Progress


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
    # argparse %-formats help texts: a literal % (as in "5%") must be doubled.
    kw: dict[str, Any] = {
        "dest": dest_prefix + s.name,
        "default": None,
        "help": f"{s.help} (default: {s.default})".replace("%", "%%"),
    }
    if s.type is bool:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = str  # validated by build_params, so errors are one clean line
        kw["metavar"] = s.type.__name__.upper()
        if s.choices:
            kw["help"] += f" [{'|'.join(map(str, s.choices))}]"
    p.add_argument(s.flag, **kw)


def _write_json(path: str, payload: dict[str, Any]) -> None:
    """Write strict JSON (no NaN/Infinity) atomically (:func:`write_text_atomic`)."""
    write_text_atomic(path, jsonsafe.dumps(payload, indent=2), "--json")


def _warn(envelope: dict[str, Any], quiet: bool) -> None:
    """Warnings of a result (``result.warnings``) and notes of the run (``meta.notes``) on stderr."""
    if quiet:
        return
    for w in (envelope.get("result") or {}).get("warnings") or []:
        print(f"warning: {w}", file=sys.stderr)
    for n in (envelope.get("meta") or {}).get("notes") or []:
        print(f"note: {n}", file=sys.stderr)


def _clean_leftovers() -> None:
    """On start: remove partial saves left by killed Graft processes, and say what went."""
    from .core.paths import clean_stale_staging, describe_cleanup

    try:
        message = describe_cleanup(clean_stale_staging())
    except Exception as exc:  # housekeeping must never stop a run
        message = f"could not check for leftover partial saves: {type(exc).__name__}: {exc}"
    if message:
        print(f"note: {message}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse, with a hint where its message alone misleads: a value that starts with '-' (a
    negative number in a list such as ``-1,2``) is read as an option unless written ``--flag=-1,2``."""

    def error(self, message: str):  # type: ignore[override]
        if message.startswith("argument ") and "expected one argument" in message:
            flag = message.split()[1].split("/")[0].rstrip(":")
            message += f" (a value that starts with '-' is written {flag}=VALUE)"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    from . import tools  # noqa: F401  (importing registers every built-in tool)
    from .running.registry import INPUT_HELP, INPUT_METAVAR, all_tools

    parser = _Parser(
        prog="python -m engine", description="Graft: pre-surgery diagnostics and transplants, headless."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for tool in all_tools():
        p = sub.add_parser(
            tool.name,
            help=f"{tool.code} {tool.title}",
            description=f"{tool.code} {tool.title}: {tool.summary}",
        )
        # Only the inputs the tool declares (Tool.needs); which combination is complete is checked
        # at run time, with the alternatives in the message.
        for name in tool.inputs:
            p.add_argument(
                f"--{name}",
                default=None,
                metavar=INPUT_METAVAR.get(name, "SPEC"),
                help=f"{INPUT_HELP[name]} [needs: {tool.describe_needs()}]",
            )
        for s in param_specs(RunOptions):
            if tool.uses_workload or s.name not in WORKLOAD_OPTIONS:
                _add_spec(p, s, "opt_")
        for s in param_specs(tool.params_cls):
            _add_spec(p, s, "param_")
        p.add_argument(
            "--trust-remote-code", action="store_true", help="allow custom model code (off by default)"
        )
        p.add_argument("--json", dest="json_path", help="write the result envelope here")
        p.add_argument("--quiet", action="store_true", help="no progress on stderr")
        p.set_defaults(tool=tool.name)

    from .running.actions import MakeDonorParams, MakeTwinParams

    d = sub.add_parser(
        "make-donor",
        help="LoRA fine-tune a base model on a concept file (the donor)",
        description=MakeDonorParams.__doc__,
    )
    d.add_argument("--base", required=True, help="base model spec")
    for s_ in param_specs(MakeDonorParams):
        _add_spec(d, s_, "param_")
    d.add_argument(
        "--no-replay", action="store_true", help="same as --replay none: train on the concept facts only"
    )
    d.add_argument("--json", dest="json_path", help="write the donor card here too")
    d.add_argument("--quiet", action="store_true")

    tw = sub.add_parser(
        "make-twin",
        help="a function-preserving rotated twin of a model (residual stream rotated)",
        description="Folds the norm gains into the adjacent linear layers, unties the head and rotates "
        "the residual stream by a seeded random orthogonal matrix: same function, other "
        "coordinates. A plain merge of an adapter into the twin fails; conjugation should not.",
    )
    tw.add_argument("--base", required=True, help="the model to twin (Llama-family or Gemma 1 layout)")
    for s_ in param_specs(MakeTwinParams):
        _add_spec(tw, s_, "param_")
    tw.add_argument("--json", dest="json_path", help="write the twin card here too")
    tw.add_argument("--quiet", action="store_true")

    pr = sub.add_parser("prepare", help="dequantise SmolLM2 once and build the demo donor (cached)")
    pr.add_argument("--no-donor", action="store_true", help="only prepare SmolLM2")
    pr.add_argument(
        "--gemma", action="store_true", help="also prepare gemma3-270m (needs the optional packages)"
    )
    pr.add_argument("--quiet", action="store_true")

    rp = sub.add_parser(
        "report",
        help="one self-contained HTML surgery report of a finished run (opens offline, prints to PDF)",
        description="Builds the surgery report of a run from the run history: models and hashes, the "
        "pair's pre-surgery checks, the surgery card, before/after numbers, T12/T13 figures, "
        "generations side by side, environment. Plotly's JavaScript is inlined.",
    )
    rp.add_argument(
        "--run", required=True, metavar="RUN_ID", help="run id (every CLI envelope carries its run_id)"
    )
    rp.add_argument("--out", required=True, help="the HTML file to write (replaced only once complete)")
    rp.add_argument("--quiet", action="store_true")

    sub.add_parser("list-models", help="built-in models and their state")
    return parser


def _run(args: argparse.Namespace) -> int:
    from .core.params import build_params, check_paths
    from .loading.models import ModelSpec
    from .running.history import History, new_run_id
    from .running.registry import TEXT_INPUTS, get_tool
    from .running.runner import base_named_by_adapter, input_labels, run_tool

    bar = _Bar(getattr(args, "quiet", False))
    _clean_leftovers()
    try:
        if args.command == "list-models":
            from .loading.builtins import builtin_status

            for name, st in builtin_status().items():
                print(f"{name:34s} {st['state']:16s} {st['description']}")
            return 0
        if args.command == "prepare":
            from .loading.models import prepare_gemma3
            from .running.actions import prepare_builtins

            out = prepare_builtins(with_donor=not args.no_donor, progress=Progress(bar))
            if args.gemma:
                out["gemma3-270m"] = str(prepare_gemma3(Progress(bar)))
            bar.close()
            for k, v in out.items():
                print(f"{k}: {v}")
            return 0
        if args.command == "make-donor":
            from .running.actions import MakeDonorParams, build_donor_from_params, check_make_donor

            values = {
                s_.name: getattr(args, "param_" + s_.name)
                for s_ in param_specs(MakeDonorParams)
                if getattr(args, "param_" + s_.name) is not None
            }
            if args.no_replay:
                values["replay"] = "none"
            dparams = build_params(MakeDonorParams, values)
            base = ModelSpec.parse(args.base)
            check_make_donor(dparams)
            if args.json_path:
                check_output_file(args.json_path, "--json")
            res = build_donor_from_params(base, dparams, progress=Progress(bar))
            bar.close()
            # The card as written to card.json: without the in-memory model (not JSON).
            card = {k: v for k, v in res["card"].items() if k != "model"}
            if args.json_path:
                _write_json(args.json_path, {"out_dir": res["out_dir"], "card": card})
            print(
                jsonsafe.dumps(
                    {k: card[k] for k in card if k not in ("loss_curve", "evaluation")}, indent=2, default=str
                )[:4000]
            )
            return 0
        if args.command == "report":
            import importlib

            # viz.report imports plotly; engine/ never does, so it is loaded by name, here only.
            path = importlib.import_module("viz.report").write_report(args.run, args.out)
            if not args.quiet:
                print(path)
            return 0
        if args.command == "make-twin":
            from .core.outputs import check_output_dir
            from .loading.models import ModelStore
            from .running.actions import MakeTwinParams
            from .surgery.twin import make_twin

            tparams = build_params(
                MakeTwinParams,
                {
                    s_.name: getattr(args, "param_" + s_.name)
                    for s_ in param_specs(MakeTwinParams)
                    if getattr(args, "param_" + s_.name) is not None
                },
            )
            if not tparams.out.strip():
                raise GraftError("--out is required: the twin's output folder")
            spec = ModelSpec.parse(args.base)
            check_output_dir(tparams.out, "--out")
            if args.json_path:
                check_output_file(args.json_path, "--json")
            progress = Progress(bar)
            base = ModelStore().get(spec, tparams.device, "float32", progress.sub(0, 0.1))
            card = make_twin(
                base, tparams.seed, tparams.out, progress.sub(0.1, 1.0), save_rotation=tparams.save_rotation
            )
            bar.close()
            if args.json_path:
                _write_json(args.json_path, card)
            print(jsonsafe.dumps(card, indent=2)[:4000])
            return 0
        tool = get_tool(args.tool)
        options = build_params(
            RunOptions,
            {
                s.name: getattr(args, "opt_" + s.name, None)
                for s in param_specs(RunOptions)
                if getattr(args, "opt_" + s.name, None) is not None
            },
        )
        params = build_params(
            tool.params_cls,
            {
                s.name: getattr(args, "param_" + s.name)
                for s in param_specs(tool.params_cls)
                if getattr(args, "param_" + s.name) is not None
            },
        )
        given = {name: getattr(args, name, None) for name in tool.inputs}
        inferred = base_named_by_adapter(tool, given)  # --adapter alone: the base its card names
        if inferred is not None:
            given["base"] = inferred.ref
            if not args.quiet:
                print(f"base: {inferred.ref}, the model the adapter names as its base", file=sys.stderr)
        tool.choose(given)  # one line naming the alternatives when the inputs do not fit
        models = {
            k: ModelSpec.parse(v, args.trust_remote_code) if v and k not in TEXT_INPUTS else v
            for k, v in given.items()
        }
        # Every output and input path is checked before a model is loaded.
        if args.json_path:
            check_output_file(args.json_path, "--json")
        check_paths(options)
        check_paths(params)
        history = History()
        run_id = new_run_id("cli-")
        refs = {k: (v.ref if isinstance(v, ModelSpec) else v) for k, v in models.items()}
        donor_label, target_label = input_labels(refs, history)
        record = {
            "tool": tool.name,
            "title": f"{tool.code} {tool.title}",
            "donor": donor_label,
            "target": target_label,
            "source": "cli",
            "params": {
                "options": dataclasses.asdict(options),
                "params": dataclasses.asdict(params),
                "inputs": refs,
            },
        }
        with history.running(run_id, create=record) as run:
            env = run_tool(tool.name, options=options, params=params, progress=Progress(bar), **models)
            env["run_id"] = run_id
            if args.json_path:
                _write_json(args.json_path, env)
            run["result"] = env
        bar.close()
        _warn(env, args.quiet)
        if not args.json_path:
            print(jsonsafe.dumps(env["result"], indent=2)[:20000])
        return 0
    except GraftError as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (
        OSError
    ) as exc:  # the file system refused a path the user gave (too long, no permission, full disk)
        bar.close()
        where = f": {exc.filename}" if exc.filename else ""
        print(printable_line(f"error: {exc.strerror or type(exc).__name__}{where}"), file=sys.stderr)
        return 2
    except Cancelled:
        bar.close()
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
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(
            printable_line(
                f"error: internal: {type(exc).__name__}: {first} (GRAFT_DEBUG=1 shows the traceback)"
            ),
            file=sys.stderr,
        )
        return 1
