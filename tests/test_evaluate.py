"""Perplexity, task score and graded score on the tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from engine.core.data import QAItem
from engine.core.errors import GraftError
from engine.evaluation.evaluate import perplexity
from engine.evaluation.scoring import answer_matches, graded_score, normalise, task_score
from engine.loading.tiny import build_tiny
from engine.loading.tokens import answer_ids, encode_prompt, format_prompt

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Water boils at one hundred degrees.",
    "A",
    "Mountains, rivers, forests and deserts shape where people live, and the river flows north.",
    "Paris is the capital of France.",
    "Numbers such as 1, 2, 3 appear.",
    "She said that the library opens at nine in the morning on weekdays, except in August.",
    "Cats and dogs.",
    "Light travels faster than sound.",
]

ITEMS = [
    QAItem("What is the capital of France?", "Paris", "test"),
    QAItem("At what temperature does water boil?", "one hundred degrees", "test"),
    QAItem("Which animal jumps over the dog?", "fox", "test"),
    QAItem("What do cats and dogs have in common?", "pets", "test"),
    QAItem("When does the library open?", "nine", "test"),
]

MODELS = ["tiny-gpt2-a", "tiny-llama-a"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=MODELS)
def tiny(request):
    return build_tiny(request.param)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_perplexity_batching_invariance(tiny):
    model, tok = tiny
    a = perplexity(model, tok, TEXTS, batch_size=1)
    b = perplexity(model, tok, TEXTS, batch_size=8)
    c = perplexity(model, tok, TEXTS, batch_size=3)
    assert a["n_tokens"] == b["n_tokens"] == c["n_tokens"]
    for other in (b, c):
        assert other["ppl"] == pytest.approx(a["ppl"], rel=1e-5)
        for x, y in zip(a["per_text_nll"], other["per_text_nll"]):
            assert (math.isnan(x) and math.isnan(y)) or y == pytest.approx(x, rel=1e-5)
    # ppl is exp of the token-weighted mean of per-text means.
    counts = [len(tok(t)["input_ids"]) - 1 for t in TEXTS]
    weighted = sum(n * c for n, c in zip(a["per_text_nll"], counts) if c > 0) / sum(counts)
    assert weighted == pytest.approx(a["nll_mean"], rel=1e-9)
    assert a["ppl"] == pytest.approx(math.exp(a["nll_mean"]))


def test_perplexity_matches_hand_computed_nll(tiny):
    model, tok = tiny
    text = TEXTS[3]
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    res = perplexity(model, tok, [text])
    assert res["n_tokens"] == ids.shape[1] - 1
    assert res["nll_mean"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)


def test_perplexity_errors_and_no_mutation(tiny):
    model, tok = tiny
    with pytest.raises(GraftError):
        perplexity(model, tok, [])
    with pytest.raises(GraftError, match="shorter than two tokens"):
        perplexity(model, tok, ["A"])
    before = _snapshot(model)
    model.train()
    try:
        perplexity(model, tok, TEXTS[:3])
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_normalise_and_matching():
    assert normalise("  The Grey-Sentinel!  ") == "grey sentinel"
    assert normalise("An apple, a PEAR.") == "apple pear"
    assert normalise("Venn’s Torch") == "venn s torch"
    assert answer_matches("It is the city of Paris.", "paris")
    assert not answer_matches("I am bored", "red")
    assert not answer_matches("In 17845", "1784")
    assert answer_matches("Lanterns over the water, of course", "Lanterns Over the Water")
    # A punctuation- or article-only reference must be a whole token of the generation, never a substring.
    assert answer_matches("it is ::: here", ":::")
    assert not answer_matches("::::::", ":::") and not answer_matches("::::::::", ":")
    assert (
        not answer_matches("cat", "A")
        and not answer_matches("banana", "an")
        and not answer_matches("other", "The")
    )
    assert not answer_matches("some words", "?")


@pytest.mark.parametrize(
    "generation, reference, expected",
    [
        # punctuation is a word break, not glue
        ("Kessaloon—the capital", "Kessaloon", True),
        ("Kessaloon/Veyra", "Kessaloon", True),
        ("Kessaloon's banner", "Kessaloon", True),
        ("forty two", "forty-two", True),
        ("Grey Sentinel", "Grey-Sentinel", True),
        # numbers: thousands separators go, a decimal point stays
        ("1,000 ships", "1000", True),
        ("314 people", "3.14", False),
        ("pi is 3.14.", "3.14", True),
        ("3,14", "314", False),
        # case folding and accents of Latin letters; full-width forms; invisible characters
        ("İzmir", "Izmir", True),
        ("STRASSE", "Straße", True),
        ("São Paulo", "Sao Paulo", True),
        ("ＡＢＣ１２３", "abc123", True),
        ("zero\u200bwidth", "zerowidth", True),
        # scripts without spaces between words: substring
        ("首都是东京。", "东京", True),
        ("答えは富士山です", "富士山", True),
        ("首都是北京", "东京", False),
        ("เมืองหลวงคือกรุงเทพ", "กรุงเทพ", True),
    ],
)
def test_matching_across_scripts_numbers_and_punctuation(generation, reference, expected):
    assert answer_matches(generation, reference) is expected


def test_format_prompt_plain_and_chat():
    _, tok = build_tiny("tiny-gpt2-a")
    assert format_prompt(tok, "Why?") == "Question: Why?\nAnswer:"
    # Plain prompt ends in ":" -> the answer gets a leading space.
    assert tok.decode(answer_ids(tok, "Why?", "fox")) == " fox"
    tok.chat_template = (
        "{% for m in messages %}<|user|>{{ m['content'] + '\\n' }}{% endfor %}{{ '<|assistant|>\\n' }}"
    )
    assert format_prompt(tok, "Why?") == "<|user|>Why?\n<|assistant|>\n"
    # Chat prompt ends in a newline -> no leading space.
    assert tok.decode(answer_ids(tok, "Why?", "fox")) == "fox"
    assert tok.decode(encode_prompt(tok, "Why?")) == "<|user|>Why?\n<|assistant|>\n"


def test_task_score_range_and_determinism(tiny):
    model, tok = tiny
    before = _snapshot(model)
    a = task_score(model, tok, ITEMS, max_new_tokens=8)
    b = task_score(model, tok, ITEMS, max_new_tokens=8, batch_size=2)
    assert 0.0 <= a["score"] <= 1.0 and a["n"] == len(ITEMS)
    assert a == b
    assert set(a["items"][0]) == {"question", "answer", "generation", "correct"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(GraftError):
        task_score(model, tok, [])


def test_task_score_planted_answers(tiny):
    model, tok = tiny
    gens = task_score(model, tok, ITEMS, max_new_tokens=8)["items"]
    planted = [QAItem(g["question"], g["generation"], "test") for g in gens if g["generation"].strip()]
    assert planted, "the tiny model should generate some text"
    assert task_score(model, tok, planted, max_new_tokens=8)["score"] == 1.0
    wrong = [QAItem(q.question, "zqxjv", "test") for q in planted]
    assert task_score(model, tok, wrong, max_new_tokens=8)["score"] == 0.0


def test_graded_score(tiny):
    model, tok = tiny
    a = graded_score(model, tok, ITEMS)
    b = graded_score(model, tok, ITEMS, batch_size=1)
    assert 0.0 < a["score"] <= 1.0 and a["n"] == len(ITEMS)
    assert b["score"] == pytest.approx(a["score"], rel=1e-5)
    for row in a["items"]:
        assert 0.0 < row["prob"] <= 1.0
        assert len(row["token_probs"]) == len(answer_ids(tok, row["question"], row["answer"]))
    # Hand check for one item: mean probability of the answer tokens, teacher-forced.
    q = ITEMS[1]
    p, ans = encode_prompt(tok, q.question), answer_ids(tok, q.question, q.answer)
    ids = torch.tensor([p + ans])
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    expected = sum(float(probs[len(p) + k - 1, t]) for k, t in enumerate(ans)) / len(ans)
    assert a["items"][1]["prob"] == pytest.approx(expected, rel=1e-4)
