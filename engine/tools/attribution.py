"""T13 ``attribution``: where the answer comes from in T, T' and D, and what the transplant changed.

T' is a finished transplant run rebuilt from the history (``--run``) or a module swap made on the
spot (``--donor``/``--target``, T11's module choice), as for T12. On one question (an index into
the concept set's test questions, or your own question and answer)
:func:`engine.evaluation.attribution.attribute`
runs captum's LayerIntegratedGradients on each of T, T' and D: the answer's first-token logit (or
its whole log-probability) attributed to every input token (the embedding layer) and to every
block's output, against a baseline that replaces only the question's tokens (the template stays).
The result holds a layers x tokens matrix per model, per-layer totals, captum's convergence delta
per layer and its size relative to ``|F(x) - F(baseline)|`` (layers over the tolerance after
``max_steps`` are listed as unreliable), and the difference T' - T. Seconds per model go in the
run's meta (the result itself is deterministic).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional

from ..core.errors import GraftError
from ..core.params import ConceptSetParam, param
from ..core.progress import Progress
from ..evaluation.attribution import BASELINES, METHOD, OBJECTIVES, TOLERANCE, attribute, difference
from ..evaluation.beforeafter import load_sets
from ..running.context import ToolContext
from ..running.rebuild import TransplantChoice, transplant_for
from ..running.registry import Tool, register


@dataclass(frozen=True)
class AttributionParams(TransplantChoice, ConceptSetParam):
    question: int = param(0, "Which test question of the concept set (0 = the first).", min=0, max=100_000)
    custom_question: str = param("", "Your own question instead (give custom_answer too).")
    custom_answer: str = param("", "The reference answer of your own question.")
    objective: str = param(
        "first-token",
        "What is attributed: the logit of the answer's first token, or the whole "
        "answer's log-probability (teacher forcing).",
        choices=OBJECTIVES,
    )
    baseline: str = param(
        "content",
        "Baseline input: 'content' replaces only the question's tokens (and the answer's, "
        "for answer-logprob) by a filler token and keeps the template; 'all' replaces "
        "every token (its early layers often do not converge).",
        choices=BASELINES,
    )
    steps: int = param(
        16, "Integration points per layer to start with (captum's n_steps, Gauss-Legendre).", min=2, max=1024
    )
    max_steps: int = param(
        128,
        "A layer whose convergence delta exceeds the tolerance is rerun with twice the points, "
        "up to this many; still over = flagged unreliable.",
        min=2,
        max=4096,
    )
    tolerance: float = param(
        TOLERANCE,
        "A layer is reliable when |convergence delta| <= tolerance x |F(x) - F(baseline)|.",
        min=1e-6,
        max=1.0,
    )


@dataclass
class AttributionResult:
    source: dict[str, Any]  # what T' is: run id or on-the-spot swap, operation, modules, weight hashes
    question: str
    answer: str
    question_index: Optional[int]  # None for a custom question
    objective: str
    steps: int
    max_steps: int
    tolerance: float
    method: str  # captum's integration rule
    baseline: str  # "content" or "all"
    baseline_text: str  # what the baseline input is, in words
    models: dict[
        str, dict[str, Any]
    ]  # "target" | "transplanted" | "donor" -> tokens, layers, matrix, totals, deltas
    difference: Optional[dict[str, Any]]  # T' - T: matrix, per-layer totals and absolute mass, max |change|
    max_abs_delta: float  # largest |convergence delta| over every model and layer
    max_rel_delta: Optional[float]  # largest |delta| / |F(x) - F(baseline)|; None where F(x) = F(baseline)
    unreliable: dict[str, list[str]]  # model key -> layers whose relative delta exceeds the tolerance


def _question(params: AttributionParams) -> tuple[str, str, Optional[int]]:
    q, a = params.custom_question.strip(), params.custom_answer.strip()
    if q or a:
        if not (q and a):
            missing = "--custom-answer" if q else "--custom-question"
            raise GraftError(
                f"a custom question needs both --custom-question and --custom-answer: {missing} is "
                f"{'blank' if (params.custom_answer if q else params.custom_question) else 'missing'}"
            )
        return q, a, None
    test = load_sets(params.concept, "")[0].test_qa()
    if not test:
        raise GraftError("the concept set has no test questions; give a custom question and answer")
    if params.question >= len(test):
        raise GraftError(
            f"--question {params.question} is out of range: the concept set has {len(test)} test questions"
        )
    item = test[params.question]
    return item.question, item.answer, params.question


def _clean(rep: dict[str, Any], label: str) -> dict[str, Any]:
    out = {k: v for k, v in rep.items() if k != "seconds"}
    out["label"] = label
    return out


def compute_attribution(ctx: ToolContext, params: AttributionParams, progress: Progress) -> AttributionResult:
    question, answer, index = _question(params)
    rb = transplant_for(ctx, params.k, params.modules, progress.sub(0.0, 0.1))
    models = [
        ("target", rb.target.model, rb.target.tokenizer, rb.target.label, rb.target.lock),
        ("transplanted", rb.working, rb.target.tokenizer, f"{rb.target.label} (transplanted)", None),
    ]
    if rb.donor is not None:
        models.append(("donor", rb.donor.model, rb.donor.tokenizer, rb.donor.label, rb.donor.lock))
    out: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    try:
        for i, (key, model, tok, label, lock) in enumerate(models):
            part = progress.sub(0.1 + 0.9 * i / len(models), 0.1 + 0.9 * (i + 1) / len(models))
            with lock if lock is not None else nullcontext():  # captum hooks the model's layers meanwhile
                rep = attribute(
                    model,
                    tok,
                    question,
                    answer,
                    objective=params.objective,
                    steps=params.steps,
                    max_steps=max(params.steps, params.max_steps),
                    baseline=params.baseline,
                    tolerance=params.tolerance,
                    progress=part,
                )
            seconds[key] = round(rep["seconds"], 3)
            out[key] = _clean(rep, label)
    finally:
        rb.undo()
    ctx.meta["attribution_seconds"] = seconds
    diff = difference(out["transplanted"], out["target"])
    progress(1.0, "attribution done")
    fill = out["target"]["filler"]
    what = "the question's tokens" + (" and the answer's" if params.objective == "answer-logprob" else "")
    text = (
        f"{what} replaced by {fill!r}; template and special tokens kept"
        if params.baseline == "content"
        else f"every input token replaced by {fill!r}"
    )
    rels = [m["max_rel_delta"] for m in out.values()]
    return AttributionResult(
        source=rb.source or {},
        question=question,
        answer=answer,
        question_index=index,
        objective=params.objective,
        steps=params.steps,
        max_steps=max(params.steps, params.max_steps),
        tolerance=params.tolerance,
        method=METHOD,
        baseline=params.baseline,
        baseline_text=text,
        models=out,
        difference=diff,
        max_abs_delta=max(m["max_abs_delta"] for m in out.values()),
        max_rel_delta=None if None in rels else max(rels),
        unreliable={k: m["unreliable"] for k, m in out.items()},
    )


TOOL = register(
    Tool(
        name="attribution",
        code="T13",
        title="Attribution before / after (captum)",
        summary="Integrated gradients (captum's LayerIntegratedGradients) of the reference answer's "
        "first-token logit, "
        "or its log-probability, to every input token and every block's output, for T, T' and D on one "
        "question: layers x tokens maps, per-layer totals, captum's convergence delta per layer (layers "
        "that do not "
        "converge are flagged), and T' − T. Takes a "
        "finished transplant run, or swaps modules itself.",
        params_cls=AttributionParams,
        compute=compute_attribution,
        figure="viz.verdict:attribution_figure",
        page="Verdict",
        same_family=True,
        needs=(("run",), ("donor", "target")),
        uses_workload=True,
        run_label="Run T13",
    )
)
