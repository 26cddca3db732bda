"""The tool registry: every diagnostic is registered once, and one conformance test runs over all.

A tool is (name, code, title, params class, compute function, figure builder path). The
figure builder lives in ``viz/`` and is referenced by dotted path so ``engine/`` never imports
plotly.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

from ..core.errors import GraftError
from ..core.params import param_specs

# What a tool can be given besides its parameters. Models: the donor D, the target T, a base
# model (what an adapter or a full fine-tune was trained from). Text inputs: an adapter (a PEFT LoRA
# folder, a make-donor folder or the demo donor's name), an organ checkpoint folder, and a run id
# from the run history (a tool that reads a finished transplant run loads that run's models itself).
# The workload is a list of texts.
CODE = re.compile(r"^(T|OP)(\d+)(?:\.(\d+))?$")  # T3, OP0, OP2.1: one code per tool

MODEL_INPUTS = ("donor", "target", "base", "adapter", "organ", "run")
TEXT_INPUTS = ("adapter", "organ", "run")  # given as text, never parsed as a model spec
INPUT_METAVAR = {"adapter": "DIR", "organ": "DIR", "run": "RUN_ID"}
INPUT_HELP = {
    "donor": "donor model: built-in name, HF folder, make-donor or saved transplant folder, .gguf file or "
    "cached hub id",
    "target": "target model (same forms as --donor)",
    "base": "the base model the adapter or the full fine-tune was trained from (same forms as --donor)",
    "adapter": "LoRA adapter: a PEFT folder (adapter_config.json + adapter_model.safetensors), a "
    "make-donor "
    "folder, or the demo donor's name",
    "organ": "organ checkpoint folder (organ.json + organ.safetensors, written by organ-extract / "
    "organ-train)",
    "run": "run id of a finished transplant run in the run history (the Runs page lists them; every CLI "
    "envelope carries its run_id)",
}


@dataclass(frozen=True)
class Tool:
    name: str  # CLI sub-command, e.g. "cka"
    code: str  # docs/methods.md id, e.g. "T2"
    title: str
    summary: str
    params_cls: type
    compute: Callable[..., Any]  # compute(ctx: ToolContext, params, progress) -> result dataclass
    figure: str  # "viz.module:function", takes the result dict and returns a plotly Figure
    page: str  # which app page shows it
    same_family: bool = False  # True: needs donor and target of one family and tokenizer (module swaps)
    # Alternatives of inputs, each a set that must be given in full, e.g. (("adapter",), ("donor", "base")).
    # The CLI offers the union as flags, the page asks only for those, the conformance suite
    # builds a fixture for each.
    needs: tuple[tuple[str, ...], ...] = (("donor", "target"),)
    uses_workload: bool = True  # reads texts (the workload options apply)
    run_label: str = ""  # the Run button's label in the app; default "Run <code>"
    # Runs on streamed models (engine.loading.stream): its work needs only captured rows, so the
    # models may be read block by block when the pair does not fit the memory budget whole.
    streams: bool = False
    # Writes T' (a module swap, a conjugation): on a streamed pair T' is staged as a folder from the
    # target's files and evaluated by whole passes that read one block at a time.
    edits: bool = False
    # Captures the output rows of every linear module (T7): the memory plan counts them.
    module_rows: bool = False
    # Can run without every layer's rows (--stats streamed, engine/running/lean_stats.py): T2, T3
    lean: bool = False
    # Runs on a model placed across devices by accelerate (engine/loading/dispatch.py): its work is
    # forward passes and captured rows alone, never a weight (an offloaded weight is not in memory)
    dispatches: bool = False
    # Its work is a grid of independent cells that --ray can spread over workers (running/cells.py)
    cells: bool = False

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every model input the tool can take, in MODEL_INPUTS order."""
        given = {name for alt in self.needs for name in alt}
        return tuple(n for n in MODEL_INPUTS if n in given)

    def choose(self, given: dict[str, Any]) -> tuple[str, ...]:
        """The first alternative fully present in ``given`` (values not None/empty); a one-line
        GraftError naming the alternatives otherwise. Inputs outside the chosen set are refused
        too, so nothing the user passed is silently ignored."""
        present = {k for k, v in given.items() if v not in (None, "")}
        unknown = present - set(self.inputs)
        if unknown:
            raise GraftError(
                f"{self.name} takes {self.describe_needs()}; it does not use "
                + ", ".join("--" + u for u in sorted(unknown))
            )
        fits = [alt for alt in self.needs if set(alt) <= present]
        if not fits:
            raise GraftError(f"{self.name} needs {self.describe_needs()}")
        best = max(fits, key=len)
        extra = present - set(best)
        if extra:
            raise GraftError(
                f"{self.name} takes {self.describe_needs()}: "
                + ", ".join("--" + e for e in sorted(extra))
                + " does not go with "
                + " and ".join("--" + a for a in best)
            )
        return best

    def describe_needs(self) -> str:
        alts = [" and ".join(f"--{n} {INPUT_METAVAR.get(n, 'SPEC')}" for n in alt) for alt in self.needs]
        return alts[0] if len(alts) == 1 else ", or ".join(alts)


_REGISTRY: dict[str, Tool] = {}


def register(tool: Tool) -> Tool:
    """Add a tool; refuses duplicates and malformed tools (checked here, once)."""
    if tool.name in _REGISTRY:
        raise ValueError(f"tool {tool.name} is already registered")
    if CODE.match(tool.code) is None:
        raise TypeError(
            f"{tool.name}: code must be T<n> (a diagnostic) or OP<n>[.<m>] (an operation), not {tool.code!r}"
        )
    taken = next((t.name for t in _REGISTRY.values() if t.code == tool.code), None)
    if taken is not None:
        raise ValueError(f"{tool.name}: code {tool.code} is already {taken}'s (one code per tool)")
    if not dataclasses.is_dataclass(tool.params_cls) or not tool.params_cls.__dataclass_params__.frozen:
        raise TypeError(f"{tool.name}: params must be a frozen dataclass")
    for spec in param_specs(tool.params_cls):
        if not spec.help:
            raise TypeError(f"{tool.name}: parameter {spec.name} has no help text")
    sig = list(inspect.signature(tool.compute).parameters)
    if sig[:3] != ["ctx", "params", "progress"]:
        raise TypeError(f"{tool.name}: compute must take (ctx, params, progress)")
    if ":" not in tool.figure or not tool.figure.startswith("viz."):
        raise TypeError(f"{tool.name}: figure must be 'viz.module:function'")
    if not tool.needs or any(not alt or set(alt) - set(MODEL_INPUTS) for alt in tool.needs):
        raise TypeError(f"{tool.name}: needs must be non-empty alternatives of {MODEL_INPUTS}")
    _REGISTRY[tool.name] = tool
    return tool


def get_tool(name: str) -> Tool:
    if not _REGISTRY:
        raise GraftError(
            f"no tool is registered, so '{name}' is unknown: import engine.tools first "
            "(engine.api and the CLI do; the registry never imports the room above it)"
        )
    if name not in _REGISTRY:
        raise GraftError(f"unknown tool '{name}': choose from {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def all_tools() -> list[Tool]:
    """Every registered tool in display order (populated by importing :mod:`engine.tools`)."""
    return sorted(_REGISTRY.values(), key=_order)


def _order(tool: Tool) -> tuple[int, int, int, str]:
    """Diagnostics first by number (T1, T2, ... T13), then operations (OP0 go / no-go, OP2.1-OP2.3
    the organ steps, OP3: docs/methods.md's transplant operations) by number, then by name."""
    m = CODE.match(tool.code)
    if m is None:
        return (2, 0, 0, tool.name)
    return (0 if m.group(1) == "T" else 1, int(m.group(2)), int(m.group(3) or 0), tool.name)
