"""Typed tool parameters with help text, shared by the CLI (argparse) and the UI (widgets).

A parameter class is a frozen dataclass whose fields are declared with :func:`param`. Values
are validated on entry (:func:`build_params`), scikit-learn style, with one-line messages.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Optional, Sequence

from .errors import GraftError

PATH_KINDS = ("in", "out_dir", "out_file")


def param(
    default: Any,
    help: str,
    *,
    min: Optional[float] = None,
    max: Optional[float] = None,
    choices: Optional[Sequence[Any]] = None,
    path: Optional[str] = None,
) -> Any:
    """Declare a tool parameter: default, help text, and optional bounds or choices.

    ``path`` marks a string that names a file: ``"in"`` (must exist and be readable), ``"out_dir"``
    or ``"out_file"`` (must be writable). :func:`check_paths` checks them before any model loads."""
    if path is not None and path not in PATH_KINDS:
        raise ValueError(f"path must be one of {PATH_KINDS}")
    return dataclasses.field(
        default=default, metadata={"help": help, "min": min, "max": max, "choices": choices, "path": path}
    )


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    name: str
    type: type
    default: Any
    help: str
    min: Optional[float]
    max: Optional[float]
    choices: Optional[tuple]
    path: Optional[str] = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def param_specs(cls: type) -> list[ParamSpec]:
    """The typed parameters of a params class: its own fields first (a tool's main knobs), then the
    fields of the groups it inherits."""
    hints = typing.get_type_hints(cls)
    own = set(getattr(cls, "__annotations__", {}))
    fields = dataclasses.fields(cls)
    out = []
    for f in [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]:
        md = f.metadata
        out.append(
            ParamSpec(
                f.name,
                hints[f.name],
                f.default,
                md.get("help", ""),
                md.get("min"),
                md.get("max"),
                tuple(md["choices"]) if md.get("choices") else None,
                md.get("path"),
            )
        )
    return out


def _coerce(spec: ParamSpec, value: Any) -> Any:
    t = spec.type
    try:
        if t is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if t is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str):
                try:
                    return int(value.strip())
                except ValueError:
                    f = float(value)  # "1e3" -> 1000; "nan", "2.5" are refused below
                    if not math.isfinite(f) or not f.is_integer():
                        raise
                    return int(f)
            return int(value)
        if t is float:
            if isinstance(value, bool):
                raise ValueError(value)
            v = float(value)
            if not math.isfinite(v):
                raise GraftError(f"{spec.flag} must be a finite number, got {value!r}")
            return v
        if t is str:
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise GraftError(f"{spec.flag} expects {t.__name__}, got {value!r}") from None
    return value


def build_params(cls: type, values: Optional[dict[str, Any]] = None) -> Any:
    """Instantiate ``cls`` from a dict, coercing types and checking bounds and choices."""
    values = dict(values or {})
    specs = {s.name: s for s in param_specs(cls)}
    unknown = set(values) - set(specs)
    if unknown:
        raise GraftError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, spec in specs.items():
        v = _coerce(spec, values[name]) if name in values and values[name] is not None else spec.default
        if spec.choices and v not in spec.choices:
            raise GraftError(f"{spec.flag} must be one of {', '.join(map(str, spec.choices))}, got {v!r}")
        if spec.min is not None and v < spec.min:
            raise GraftError(f"{spec.flag} must be >= {spec.min}, got {v}")
        if spec.max is not None and v > spec.max:
            raise GraftError(f"{spec.flag} must be <= {spec.max}, got {v}")
        kwargs[name] = v
    return cls(**kwargs)


def check_paths(params: Any) -> None:
    """Check every path parameter of ``params`` that is set (inputs readable, outputs writable),
    so bad paths fail in one line before any model is loaded."""
    from .outputs import check_input_file, check_output_dir, check_output_file

    for spec in param_specs(type(params)):
        value = getattr(params, spec.name)
        if spec.path is None or not isinstance(value, str) or not value.strip():
            continue
        if spec.path == "in":
            check_input_file(value, spec.flag)
        elif spec.path == "out_dir":
            check_output_dir(value, spec.flag)
        else:
            check_output_file(value, spec.flag)


# RunOptions fields that only matter to a tool that reads texts (Tool.uses_workload).
WORKLOAD_OPTIONS = frozenset({"workload", "max_tokens", "batch_size", "outlier_factor"})


# --------------------------------------------------------------------------------------------
# Parameter groups: a field that several tools take is declared once, with one help text, in a
# group; a tool's params class inherits the groups it takes. Code that needs a group's fields
# checks the type (isinstance), never the attribute names.

SCORES = ("graded", "exact")


@dataclasses.dataclass(frozen=True)
class ConceptSetParam:
    """The concept set a tool evaluates or asks questions from."""

    concept: str = param(
        "",
        "Concept set (JSONL or a .json array): perplexity on its facts, task score on its test "
        "questions. Empty = the bundled set.",
        path="in",
    )


@dataclasses.dataclass(frozen=True)
class RetainedSetParam:
    """The retained set: general texts a transplant should leave alone."""

    retained: str = param(
        "",
        "Retained general set (JSONL or a .json array): texts the transplant should leave alone "
        "(retained perplexity, locality). Empty = the bundled set.",
        path="in",
    )


@dataclasses.dataclass(frozen=True)
class EvaluationSets(RetainedSetParam, ConceptSetParam):
    """Both sets of a before/after evaluation (T11): the runner reads and checks them before any
    model loads."""


@dataclasses.dataclass(frozen=True)
class TaskScoreParam:
    """Which task score S the transfer metrics (TIR, Recovery) are computed from."""

    score: str = param(
        "graded",
        "Task score S behind TIR and Recovery: graded (mean answer-token probability) or "
        "exact (the greedy answer contains the reference).",
        choices=SCORES,
    )


@dataclasses.dataclass(frozen=True)
class GreedyTokensParam:
    """How long the greedy generations of an evaluation are."""

    max_new_tokens: int = param(
        16,
        "Greedy tokens generated per test question (exact score, shown generations) and "
        "per retained prompt (locality).",
        min=1,
        max=512,
    )


@dataclasses.dataclass(frozen=True)
class BridgeRidge:
    """The ridge strength of every closed-form linear map (T4's bridges, the organ bridges, T3's ridge
    maps)."""

    ridge_alpha: float = param(
        0.01,
        "Ridge strength of the fitted linear map (bridge), relative to the mean eigenvalue of X^T X.",
        min=0.0,
        max=1e6,
    )


@dataclasses.dataclass(frozen=True)
class HeldOutFit(BridgeRidge):
    """The parameters of every linear map fitted on some texts and judged on held-out ones (T3's
    Procrustes and ridge maps, T4's bridges): declared once, inherited by both tools' params."""

    heldout_fraction: float = param(
        0.25,
        "Share of texts (or rows, with fewer than 4 texts) held out to judge each fitted map.",
        min=0.05,
        max=0.9,
    )
    seed: int = param(0, "Seed of the fit / held-out split.", min=0, max=2**31 - 1)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Options every pair tool shares: the workload and how to run the models."""

    workload: str = param(
        "",
        'Workload file (concept-set JSONL, JSONL of {"text"}, the same as one .json array, or .txt one '
        "text per line). Empty = the bundled concept set.",
        path="in",
    )
    max_tokens: int = param(
        2048, "Token budget for activation capture (bounds memory).", min=8, max=1_000_000
    )
    batch_size: int = param(8, "Texts per forward pass.", min=1, max=512)
    device: str = param(
        "auto", "Where to run: auto (CUDA when present), cpu or cuda.", choices=("auto", "cpu", "cuda")
    )
    dtype: str = param(
        "float32",
        "Model weights dtype; bfloat16 halves memory on GPU.",
        choices=("float32", "bfloat16", "float16"),
    )
    max_memory: str = param(
        "",
        "Memory budget of the run, e.g. 8GiB or 16GB (empty = 85% of the memory available now). Graft "
        "plans the run before reading any weight and refuses in one line when it cannot stay under it.",
    )
    stream: str = param(
        "auto",
        "Stream the models block by block from their safetensors shards: auto = when the pair does not fit "
        "the memory budget whole; on = always; off = never. T1-T4 run on streamed models. dispatch = "
        "accelerate's device_map='auto' across the GPU, the CPU and disk (T2, T3, T4, T7); auto picks it "
        "on a GPU when the pair fits across the GPU and the CPU.",
        choices=("auto", "on", "off", "dispatch"),
    )
    stats: str = param(
        "auto",
        "How T2 and T3 keep their rows on streamed models: rows = every layer's rows in memory (exact "
        "CKA); streamed = nothing but Gram matrices per minibatch (T2: minibatch unbiased HSIC) and one "
        "layer pair at a time (T3: both models read in step); auto = streamed when the rows would not "
        "fit the memory budget.",
        choices=("auto", "rows", "streamed"),
    )
    ray: str = param(
        "",
        "Run a sweep's independent cells (T8's K values, T9's positions and seeds, T10's positions and "
        "sizes) on Ray workers: auto = a local Ray started on demand, or a running cluster's address "
        "(host:port). Empty = in this process. Workers load the models by path or built-in name, one "
        "set per worker.",
    )
    outlier_factor: float = param(
        20.0,
        "T2-T4 drop tokens whose residual norm, in any layer of either model, exceeds this multiple of "
        "that layer's median (attention-sink 'massive activations', often 100x the median, which otherwise "
        "dominate CKA and Procrustes). 0 keeps every token.",
        min=0.0,
        max=1e6,
    )


def list_items(text: str, flag: str, empty_means: str) -> list[str]:
    """The items of a comma-separated list parameter, one rule for all of them: an empty value (or
    only spaces) means the default, ``empty_means``, and yields ``[]``; a value that holds only
    separators (``' , ,'``) names nothing and is an error, never read as the default."""
    text = text or ""
    items = [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]
    if text.strip() and not items:
        raise GraftError(f"{flag} names nothing ({text!r}); leave it empty for {empty_means}")
    return items


@dataclasses.dataclass(frozen=True)
class OptimParams:
    """The optimiser shared by organ training, recovery, trained bridges and the LoRA baseline
    (:class:`engine.core.train_config.TrainConfig`; default the NOT paper's)."""

    lr: float = param(
        1e-4, "AdamW peak learning rate (linear warm-up, then cosine decay to 0).", min=1e-8, max=1.0
    )
    weight_decay: float = param(0.01, "AdamW weight decay.", min=0.0, max=10.0)
    warmup: float = param(0.1, "Share of the training steps spent warming up.", min=0.0, max=0.99)
    train_batch: int = param(8, "Training texts per step.", min=1, max=512)


@dataclasses.dataclass(frozen=True)
class TrainTextsParam:
    """The texts recovery and trained bridges learn from (the paper: about 1,000 general texts)."""

    train_texts: str = param(
        "",
        'Training texts: a {"text"} JSONL (or .json array, or one text a line), e.g. the bundled general '
        "corpus data/general/train.jsonl. Empty = the workload's texts.",
        path="in",
    )
