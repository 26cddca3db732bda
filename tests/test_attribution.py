"""T13 attribution (engine/attribution.py, engine/tools/attribution.py) with captum.

Completeness is checked against F measured here, independently of the tool's objective function:
the logit of the answer's first token after the prompt (or the answer's log-probability), on the
input and on the all-pad baseline. Each layer's attributions must sum to F(x) - F(baseline) within
captum's own convergence delta, and that delta must be small. Identical models give identical maps.
"""
import pytest
import torch

from engine.attribution import attribute
from engine.context import run_tool
from engine.evaluate import answer_ids, encode_prompt, pad_id
from engine.models import ModelSpec, load_model

QUESTION, ANSWER = "Where does the river flow?", "north through the valley"


def _f(model, tok, objective):
    prompt, ans = encode_prompt(tok, QUESTION), answer_ids(tok, QUESTION, ANSWER)
    ids = prompt + (ans if objective == "answer-logprob" else [])
    with torch.no_grad():
        out = []
        for seq in (ids, [pad_id(tok)] * len(ids)):
            logits = model(input_ids=torch.tensor([seq])).logits[0].double()
            if objective == "first-token":
                out.append(float(logits[len(prompt) - 1, ans[0]]))
            else:
                lp = torch.log_softmax(logits, -1)
                out.append(float(sum(lp[len(prompt) - 1 + j, a] for j, a in enumerate(ans))))
    return out[0] - out[1]


@pytest.mark.parametrize("name", ["tiny-gpt2-a", "tiny-llama-a"])
@pytest.mark.parametrize("objective", ["first-token", "answer-logprob"])
def test_completeness_within_the_convergence_delta(name, objective, one_thread):
    m = load_model(ModelSpec.parse(name), "cpu")
    rep = attribute(m.model, m.tokenizer, QUESTION, ANSWER, objective=objective, steps=64)
    want = _f(m.model, m.tokenizer, objective)
    assert abs(rep["f_input"] - rep["f_baseline"] - want) < 1e-4
    assert len(rep["layers"]) == m.arch.n_layers + 1 and rep["layers"][0] == "embeddings"
    assert all(len(row) == len(rep["tokens"]) for row in rep["matrix"])
    for total, delta in zip(rep["layer_totals"], rep["deltas"]):
        assert abs(total - want) <= abs(delta) + 1e-4, (total, want, delta)
        if name == "tiny-gpt2-a":  # converges; on the random tiny Llama the early layers' delta does not
            # shrink with more steps (seen: 16 -> 64 -> 256 steps), which is why the delta is always reported
            assert abs(delta) <= 0.02 * abs(want) + 1e-3, (delta, want)


def test_identical_models_give_identical_maps(one_thread):
    a = ModelSpec.parse("tiny-llama-a")
    env = run_tool("attribution", a, a, {}, {"modules": "blocks.1.mlp.down", "steps": 8})
    r = env["result"]
    assert r["models"]["target"]["matrix"] == r["models"]["transplanted"]["matrix"] == r["models"]["donor"]["matrix"]
    assert r["difference"]["max_abs"] == 0.0
    assert set(env["meta"]["attribution_seconds"]) == {"target", "transplanted", "donor"}


def test_a_real_swap_changes_the_map(tiny_run, one_thread):
    env = run_tool("attribution", run=tiny_run["run_id"], params={"steps": 8})
    r = env["result"]
    assert r["source"]["run_id"] == tiny_run["run_id"] and r["steps"] == 8
    assert r["difference"]["max_abs"] > 0
    # T' is the run's T' (same weights), so its map differs from T's; D's map is its own.
    assert r["models"]["transplanted"]["f_input"] != r["models"]["target"]["f_input"]
    assert r["models"]["donor"]["label"] == tiny_run["envelope"]["donor"]


def test_custom_question_needs_both_parts():
    from engine.errors import GraftError

    a = ModelSpec.parse("tiny-gpt2-a")
    with pytest.raises(GraftError, match="custom"):
        run_tool("attribution", a, a, {}, {"custom_question": "Why?"})
