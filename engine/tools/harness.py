"""T14 ``lm-eval``: T and T' of a transplant run judged by EleutherAI's lm-evaluation-harness
(docs/methods.md, "lm-evaluation-harness"; :mod:`engine.evaluation.harness`).

T' is the run rebuilt from the history (``--run``, as T12 rebuilds it), evaluated in memory
(lm-eval's ``HFLM`` takes the model object), then rolled back. The tasks are Graft's own, written
for the run from its concept set, its retained set and the bundled general corpus, plus any under
``--include-path``. Standard errors are the harness's own (null where it defines none: its
weighted perplexities).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..core.data import builtin_concept_path, builtin_retained_path, load_concept_set
from ..core.errors import GraftError
from ..core.params import list_items, param
from ..core.progress import Progress
from ..evaluation.beforeafter import locked
from ..evaluation.harness import GRAFT_TASKS, drop_folder, run_harness, task_folder, write_tasks
from ..running.context import ToolContext
from ..running.rebuild import load_run, transplant_for
from ..running.registry import Tool, register


@dataclass(frozen=True)
class LmEvalParams:
    tasks: str = param(
        "",
        "Comma-separated lm-eval tasks. Empty = Graft's four: " + ", ".join(GRAFT_TASKS) + ".",
    )
    include_path: str = param(
        "", "A folder of your own lm-eval task definitions (YAML), as lm-eval's --include_path.", path="in"
    )
    limit: int = param(0, "At most this many documents per task (0 = every document).", min=0, max=10_000_000)
    bootstrap_iters: int = param(
        1000, "Bootstrap resamples for the harness's standard errors of metrics it bootstraps (your "
        "own tasks' medians, F1, BLEU...).", min=0,
        max=1_000_000,
    )  # fmt: skip
    max_new_tokens: int = param(16, "Greedy tokens per answer in graft_concept_gen.", min=1, max=512)


@dataclass
class LmEvalResult:
    source: dict[str, Any]  # the run: id, tool, operation, modules, weight hashes
    tasks: list[str]
    # "T" and "T′" -> task -> metric -> value, with "<metric>_stderr" beside each
    models: dict[str, dict[str, dict[str, Optional[float]]]]
    concept: str
    retained: str
    harness_version: str
    n_samples: dict[str, Any]


def compute_lm_eval(ctx: ToolContext, params: LmEvalParams, progress: Progress) -> LmEvalResult:
    import importlib.metadata

    tasks = list_items(params.tasks, "--tasks", "Graft's four tasks") or list(GRAFT_TASKS)
    if ctx.run is None:
        raise GraftError("lm-eval judges a finished transplant: give --run RUN_ID")
    run_params = (load_run(ctx.run).get("meta") or {}).get("params") or {}
    concept = load_concept_set(run_params.get("concept") or builtin_concept_path())
    retained = load_concept_set(run_params.get("retained") or builtin_retained_path())
    rb = transplant_for(ctx, 1, "", progress.sub(0.0, 0.1))
    folder = task_folder()
    models: dict[str, Any] = {}
    n_samples: dict[str, Any] = {}
    try:
        tok = rb.target.tokenizer
        write_tasks(folder, tok, concept, retained, params.max_new_tokens)
        for k, (label, net) in enumerate((("T", rb.target.model), ("T′", rb.working))):
            progress.check()
            progress(0.1 + 0.45 * k, f"lm-eval on {label}: {', '.join(tasks)}")
            with locked(rb.target):  # T is the cached target; T' shares its untouched tensors
                out = run_harness(
                    net,
                    tok,
                    tasks,
                    folder,
                    include_path=params.include_path,
                    limit=params.limit,
                    batch_size=ctx.options.batch_size,
                    bootstrap_iters=params.bootstrap_iters,
                )
            models[label] = out["results"]
            n_samples = out["n_samples"]
    finally:
        rb.undo()
        drop_folder(folder)
    progress(1.0, "judged")
    return LmEvalResult(
        source=rb.source or {},
        tasks=tasks,
        models=models,
        concept=concept.name,
        retained=retained.name,
        harness_version=importlib.metadata.version("lm_eval"),
        n_samples=n_samples,
    )


TOOL = register(
    Tool(
        name="lm-eval",
        code="T14",
        title="lm-evaluation-harness on T and T′",
        summary="Judges T and T′ of a transplant run with EleutherAI's lm-evaluation-harness: Graft's "
        "concept, retained and general-text tasks (and your own), with standard errors.",
        params_cls=LmEvalParams,
        compute=compute_lm_eval,
        figure="viz.harness:harness_figure",
        page="Compare",
        needs=(("run",),),
        uses_workload=False,
        run_label="Run lm-eval",
    )
)
