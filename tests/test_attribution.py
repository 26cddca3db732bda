"""T13 attribution (engine/evaluation/attribution.py, engine/tools/attribution.py) with captum.

Completeness is checked against F measured here, independently of the tool's objective function
(full logits, no ``logits_to_keep``): the logit of the answer's first token after the prompt (or the
answer's log-probability), on the input and on the baseline. Every layer's attributions, the
embeddings and the first block included, must sum to F(x) - F(baseline) within a small fraction of
it, and the error must shrink with more integration points. The old all-pad baseline failed this on
the tiny Llama (its pad row is zero: every layer's baseline sat on RMSNorm's singular point, and the
embedding layer's delta stayed at 0.1-0.7 x |F(x) - F(b)| from 16 to 1024 steps).
"""

import pytest
import torch

from engine.evaluation.attribution import attribute, filler_token
from engine.loading.models import ModelSpec, load_model
from engine.loading.tokens import answer_ids, encode_prompt, pad_id
from engine.running.runner import run_tool

QUESTION, ANSWER = "Where does the river flow?", "north through the valley"


def _f(model, tok, objective, ids):
    """F(ids) from the full logits (not the tool's objective function)."""
    n_prompt = len(encode_prompt(tok, QUESTION))
    ans = answer_ids(tok, QUESTION, ANSWER)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    if objective == "first-token":
        return float(logits[n_prompt - 1, ans[0]])
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[n_prompt - 1 + j, a] for j, a in enumerate(ans)))


@pytest.mark.parametrize("name", ["tiny-gpt2-a", "tiny-llama-a"])
@pytest.mark.parametrize("objective", ["first-token", "answer-logprob"])
def test_every_layer_is_complete(name, objective, one_thread):
    m = load_model(ModelSpec.parse(name), "cpu")
    tok = m.tokenizer
    rep = attribute(m.model, tok, QUESTION, ANSWER, objective=objective, steps=32)
    prompt, ans = encode_prompt(tok, QUESTION), answer_ids(tok, QUESTION, ANSWER)
    assert rep["input_ids"] == prompt + (ans if objective == "answer-logprob" else [])
    # the baseline changes exactly the question's tokens (and the answer's), nothing of the template
    changed = [i for i, (a, b) in enumerate(zip(rep["input_ids"], rep["baseline_ids"])) if a != b]
    assert tok.decode([rep["input_ids"][i] for i in changed if i < len(prompt)]).strip() == QUESTION
    assert all(i in changed for i in range(len(prompt), len(rep["input_ids"])))
    want = _f(m.model, tok, objective, rep["input_ids"]) - _f(m.model, tok, objective, rep["baseline_ids"])
    assert abs(want) > 1e-3
    assert abs(rep["f_input"] - rep["f_baseline"] - want) < 1e-4 * max(1.0, abs(want))
    assert len(rep["layers"]) == m.arch.n_layers + 1 and rep["layers"][:2] == ["embeddings", "block 0"]
    assert all(len(row) == len(rep["tokens"]) for row in rep["matrix"])
    for label, total, delta in zip(rep["layers"], rep["layer_totals"], rep["deltas"]):
        assert abs(total - want) <= 0.01 * abs(want), (label, total, want)  # complete, every layer
        assert abs(total - want - delta) <= 1e-4 * abs(want) + 1e-6, (
            label,
            total,
            want,
            delta,
        )  # captum's delta is that error
    assert rep["unreliable"] == [] and rep["max_rel_delta"] <= 0.01


@pytest.mark.parametrize("name", ["tiny-gpt2-a", "tiny-llama-a"])
def test_the_error_does_not_grow_with_more_points(name, one_thread):
    """(The tiny random models are nearly linear: 16 points already reach float precision, so the
    shrinking itself is measured on SmolLM2, see docs/measurements.md.)"""
    m = load_model(ModelSpec.parse(name), "cpu")
    few = attribute(m.model, m.tokenizer, QUESTION, ANSWER, objective="answer-logprob", steps=2)
    many = attribute(m.model, m.tokenizer, QUESTION, ANSWER, objective="answer-logprob", steps=32)
    assert few["f_input"] == many["f_input"] and few["f_baseline"] == many["f_baseline"]
    scale = abs(many["f_input"] - many["f_baseline"])
    for label, a, b in zip(many["layers"], few["deltas"], many["deltas"]):
        assert abs(b) <= max(abs(a), 1e-5 * scale), (label, a, b)


def test_the_filler_is_never_a_zero_embedding(one_thread):
    m = load_model(ModelSpec.parse("tiny-llama-a"), "cpu")
    emb = m.model.get_input_embeddings().weight
    assert float(emb[pad_id(m.tokenizer)].norm()) == 0.0  # padding_idx: the old baseline's token
    f = filler_token(m.model, m.tokenizer)
    assert f != pad_id(m.tokenizer) and float(emb[f].norm()) > 0


def test_layers_over_the_tolerance_are_flagged(one_thread):
    m = load_model(ModelSpec.parse("tiny-llama-a"), "cpu")
    strict = attribute(m.model, m.tokenizer, QUESTION, ANSWER, steps=2, tolerance=1e-9)
    assert strict["unreliable"] == [lab for lab, r in zip(strict["layers"], strict["rel_deltas"]) if r > 1e-9]
    assert strict["unreliable"] and strict["layer_steps"] == [2] * len(strict["layers"])
    grown = attribute(m.model, m.tokenizer, QUESTION, ANSWER, steps=2, max_steps=8, tolerance=1e-9)
    for label, n, r in zip(grown["layers"], grown["layer_steps"], grown["rel_deltas"]):
        assert n in (2, 4, 8) and (n == 8 or r <= 1e-9), (label, n, r)  # doubled 2 -> 4 -> 8 while over
        assert (label in grown["unreliable"]) == (r > 1e-9)
    assert 8 in grown["layer_steps"]


def test_identical_models_give_identical_maps(one_thread):
    a = ModelSpec.parse("tiny-llama-a")
    env = run_tool("attribution", a, a, {}, {"modules": "blocks.1.mlp.down", "steps": 8, "max_steps": 8})
    r = env["result"]
    assert (
        r["models"]["target"]["matrix"]
        == r["models"]["transplanted"]["matrix"]
        == r["models"]["donor"]["matrix"]
    )
    assert r["difference"]["max_abs"] == 0.0
    assert set(env["meta"]["attribution_seconds"]) == {"target", "transplanted", "donor"}


def test_a_real_swap_changes_the_map(tiny_run, one_thread):
    env = run_tool("attribution", run=tiny_run["run_id"], params={"steps": 8, "max_steps": 8})
    r = env["result"]
    assert r["source"]["run_id"] == tiny_run["run_id"] and r["steps"] == 8
    assert r["difference"]["max_abs"] > 0
    # T' is the run's T' (same weights), so its map differs from T's; D's map is its own.
    assert r["models"]["transplanted"]["f_input"] != r["models"]["target"]["f_input"]
    assert r["models"]["donor"]["label"] == tiny_run["envelope"]["donor"]


def test_custom_question_needs_both_parts():
    from engine.core.errors import GraftError

    a = ModelSpec.parse("tiny-gpt2-a")
    with pytest.raises(GraftError, match="custom"):
        run_tool("attribution", a, a, {}, {"custom_question": "Why?"})


def test_the_old_zero_baseline_does_not_converge(monkeypatch, one_thread):
    """The cause of the old failure, kept as a check: with the tiny Llama's zero pad row as the
    filler of every position, each layer's baseline activation is exactly zero, the path starts on
    RMSNorm's singular point, and the early layers' error does not shrink with more points."""
    import engine.evaluation.attribution as attribution

    m = load_model(ModelSpec.parse("tiny-llama-a"), "cpu")
    monkeypatch.setattr(attribution, "filler_token", lambda model, tok: pad_id(tok))
    for steps in (16, 256):
        rep = attribute(m.model, m.tokenizer, QUESTION, ANSWER, baseline="all", steps=steps)
        assert rep["f_baseline"] == 0.0  # zero everywhere: the logits of a zero residual stream
        assert {"embeddings", "block 0"} <= set(rep["unreliable"]), (steps, rep["rel_deltas"])
