"""lm-evaluation-harness on Graft's own tasks (engine/evaluation/harness.py, the ``lm-eval`` tool):
two independent implementations of perplexity must agree, and bad input is refused in one line."""

from __future__ import annotations

import json
import math

import pytest
from tokenizers import processors

from engine.core.data import ConceptSet, builtin_concept_path, load_concept_set
from engine.core.errors import GraftError
from engine.evaluation.evaluate import perplexity
from engine.evaluation.harness import GRAFT_TASKS, run_harness, write_tasks
from engine.loading.tiny import SPECIAL, build_tiny

TEXTS = (
    "The river flows north through the valley and into the cold sea.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Cats and dogs are common pets; parrots can learn to speak words.",
    "Light travels faster than sound, which is why we see lightning first.",
)


@pytest.fixture(scope="module")
def bos_model():
    """tiny-llama-a whose tokenizer writes a BOS before every text, as Llama's does: Graft then scores
    every content token after the BOS, and lm-eval every content token after its prefix token (the
    same BOS), so the two perplexities are the same quantity."""
    model, tok = build_tiny("tiny-llama-a")
    bos = tok.convert_tokens_to_ids(SPECIAL)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL} $A", special_tokens=[(SPECIAL, bos)]
    )
    assert tok("a b")["input_ids"][0] == bos == tok.bos_token_id
    return model, tok


def _retained() -> ConceptSet:
    return ConceptSet(name="four", facts=TEXTS, qa=(), path="", sha256="")


def test_lm_eval_token_perplexity_equals_graft_perplexity(bos_model, tmp_path):
    model, tok = bos_model
    folder = write_tasks(tmp_path / "tasks", tok, load_concept_set(builtin_concept_path()), _retained())
    out = run_harness(model, tok, ["graft_retained_ppl"], folder, batch_size=2, bootstrap_iters=100)
    lm = out["results"]["graft_retained_ppl"]
    ours = perplexity(model, tok, list(TEXTS))["ppl"]
    assert lm["token_perplexity"] == pytest.approx(ours, rel=1e-4)
    # lm-eval defines no standard error for its weighted perplexities: reported as null, not invented
    assert lm["token_perplexity_stderr"] is None
    # the harness's own word and byte perplexities come from the same log-likelihoods
    n_words = sum(len(t.split()) for t in TEXTS)
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    ll = -math.log(ours) * n_tokens
    assert lm["word_perplexity"] == pytest.approx(math.exp(-ll / n_words), rel=1e-4)
    assert out["n_samples"]["graft_retained_ppl"]["effective"] == len(TEXTS)


def test_every_graft_task_runs_and_the_data_is_written(bos_model, tmp_path):
    model, tok = bos_model
    concept = load_concept_set(builtin_concept_path())
    folder = write_tasks(tmp_path / "tasks", tok, concept, _retained(), max_new_tokens=4)
    rows = [json.loads(x) for x in (folder / "concept_qa.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == [q.answer for q in concept.test_qa()]
    out = run_harness(model, tok, list(GRAFT_TASKS), folder, limit=3, batch_size=4, bootstrap_iters=50)
    res = out["results"]
    assert set(res) == set(GRAFT_TASKS)
    assert 0.0 <= res["graft_concept_gen"]["exact"] <= 1.0 and "exact_stderr" in res["graft_concept_gen"]
    ll = res["graft_concept_ll"]
    assert ll["token_perplexity"] > 1.0 and 0.0 <= ll["acc"] <= 1.0 and ll["acc_stderr"] is not None
    assert res["graft_general_ppl"]["token_perplexity"] > 1.0


def test_unknown_tasks_and_missing_folders_are_refused_in_one_line(bos_model, tmp_path):
    model, tok = bos_model
    folder = write_tasks(tmp_path / "tasks", tok, load_concept_set(builtin_concept_path()), _retained())
    with pytest.raises(GraftError, match="unknown lm-eval task"):
        run_harness(model, tok, ["hellaswag"], folder)
    with pytest.raises(GraftError, match="not a folder"):
        run_harness(model, tok, ["graft_retained_ppl"], folder, include_path=str(tmp_path / "nope"))
    empty = ConceptSet(name="no-test", facts=("a fact.",), qa=(), path="", sha256="")
    with pytest.raises(GraftError, match="no held-out test questions"):
        write_tasks(tmp_path / "t2", tok, empty, _retained())
