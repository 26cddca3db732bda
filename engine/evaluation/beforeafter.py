"""Before/after evaluation shared by every transplant (module swap, K sweep, conjugation):
the concept and retained sets, T / T' / D metrics rounded for JSON, TIR and Recovery with their
undefined cases, evaluation of a shared cached model under its lock, and the side-by-side answers
of T, T' and D with the words the transplant changed (docs/methods.md T11)."""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Optional

from ..core.data import ConceptSet, builtin_concept_path, builtin_retained_path, load_concept_set
from ..core.errors import GraftError
from ..core.jsonsafe import rnd
from ..core.params import EvaluationSets
from ..core.progress import Progress
from .evalcache import evaluate_model
from .evaluate import word_diff

METRIC_KEYS = ("ppl_concept", "ppl_retained", "task_score", "task_score_exact", "task_score_graded")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def transfer_metrics(
    s_target: float, s_transplanted: float, s_donor: float, *, tol: float = 1e-12
) -> dict[str, Any]:
    """TIR = S(T')/S(T) and Recovery = (S(T') - S(T)) / (S(D) - S(T)) (docs/methods.md T8).

    Undefined cases are reported as ``None`` with a status and a one-line note, never NaN:
    S(T) = 0 makes TIR infinite (or 0/0 when S(T') = 0 too); S(D) = S(T) (within ``tol``)
    leaves nothing to recover.
    """
    out: dict[str, Any] = {
        "tir": None,
        "tir_status": "ok",
        "tir_note": "",
        "recovery": None,
        "recovery_status": "ok",
        "recovery_note": "",
    }
    if not all(_finite(v) for v in (s_target, s_transplanted, s_donor)):
        note = (
            f"undefined: a score is missing or not finite (S(T)={s_target}, S(T')={s_transplanted}, "
            f"S(D)={s_donor})"
        )
        out.update(
            tir_status="undefined",
            tir_note="TIR " + note,
            recovery_status="undefined",
            recovery_note="Recovery " + note,
        )
        return out
    if abs(s_target) <= tol:
        what = (
            f"S(T')/S(T) = {s_transplanted:.4g}/0 is infinite"
            if s_transplanted > tol
            else "S(T') = 0 too, and S(T')/S(T) is 0/0"
        )
        out.update(tir_status="undefined", tir_note=f"TIR undefined: the target scores S(T) = 0, so {what}")
    else:
        out["tir"] = s_transplanted / s_target
    if abs(s_donor - s_target) <= tol:
        out.update(
            recovery_status="undefined",
            recovery_note="Recovery undefined: the donor scores the same as the target (S(D) = S(T) = "
            f"{s_target:.4g}), "
            "so there is nothing to recover",
        )
    else:
        out["recovery"] = (s_transplanted - s_target) / (s_donor - s_target)
    return out


def load_sets(concept: str, retained: str) -> tuple[ConceptSet, ConceptSet]:
    return (
        load_concept_set(concept or builtin_concept_path()),
        load_concept_set(retained or builtin_retained_path()),
    )


def precheck_sets(params: Any) -> None:
    """A tool that scores T, T' and D on a concept set (its params are :class:`EvaluationSets`):
    read both files and check the concept set has test questions before any model loads, so a wrong
    file costs one line, not a minute of loading and forward passes."""
    if not isinstance(params, EvaluationSets):
        return
    concept, _ = load_sets(params.concept, params.retained)
    if not concept.test_qa():
        raise GraftError(
            f"concept set {concept.name} has no test questions to score (give some qa items split 'test')"
        )


def metrics(ev: dict[str, Any]) -> dict[str, Optional[float]]:
    return {k: rnd(ev[k]) for k in METRIC_KEYS}


def transfer_scores(s_t: float, s_tp: float, s_d: float) -> dict[str, Any]:
    tm = transfer_metrics(s_t, s_tp, s_d)
    tm["tir"], tm["recovery"] = rnd(tm["tir"]), rnd(tm["recovery"])
    return tm


def evaluate_shared(
    model: Any,
    sets: tuple[ConceptSet, ConceptSet],
    score: str,
    max_new_tokens: int,
    progress: Progress,
    state_hash: Optional[str] = None,
    exact: bool = True,
    heldout_concept: bool = False,
) -> dict[str, Any]:
    """Evaluate a cached shared model (LoadedModel) under its lock: a capture elsewhere attaches hooks."""
    with model.lock:
        return evaluate_model(
            model.model,
            model.tokenizer,
            sets[0],
            sets[1],
            score=score,
            exact=exact,
            max_new_tokens=max_new_tokens,
            state_hash=state_hash,
            progress=progress,
            heldout_concept=heldout_concept,
        )


@contextmanager
def locked(*models: Any) -> Iterator[None]:
    """Hold the lock of each distinct model (donor and target may be one object; locks are not re-entrant)."""
    with ExitStack() as stack:
        seen: set[int] = set()
        for m in models:
            if id(m.lock) not in seen:
                seen.add(id(m.lock))
                stack.enter_context(m.lock)
        yield


def side_by_side(ev_t: dict, ev_tp: dict, ev_d: dict) -> list[dict[str, Any]]:
    """The answers of T, T' and D per test question; none when the evaluation generated none (a
    streamed run scored by the graded score)."""
    if any(it.get("generation") is None for ev in (ev_t, ev_tp, ev_d) for it in ev["items"]):
        return []
    rows = []
    for a, b, c in zip(ev_t["items"], ev_tp["items"], ev_d["items"]):
        rows.append(
            {
                "question": a["question"],
                "reference": a["answer"],
                "target": a["generation"],
                "transplanted": b["generation"],
                "donor": c["generation"],
                "target_correct": a["correct"],
                "transplanted_correct": b["correct"],
                "donor_correct": c["correct"],
                "changed": a["generation"] != b["generation"],
                "diff": word_diff(a["generation"], b["generation"]),  # target -> transplanted, word level
            }
        )
    return rows
