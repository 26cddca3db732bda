"""The alignment score across tokenizers (engine/evaluation/word_agreement.py): greedy next words at
word ends. Ground truth from oracle language models that spell a known text through their own
tokenizers: two oracles of one text agree everywhere, whatever their vocabularies, and an oracle of
an edited text disagrees exactly where the next word was edited."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.core.errors import GraftError
from engine.evaluation.evalcache import alignment_score
from engine.evaluation.word_agreement import next_word, word_agreement, word_ends
from engine.loading.tiny import build_tiny


class Oracle(torch.nn.Module):
    """Predicts, after any prefix of a known text, the token its tokenizer would write next: the
    first token of the rest of ``truth`` (the prefix's own text located in it)."""

    def __init__(self, tok, truths: dict[str, str]) -> None:
        super().__init__()
        self.tok, self.truths = tok, truths
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=512)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        self.calls += 1
        V = len(self.tok)
        out = torch.full((input_ids.shape[0], 1, V), -1e9)
        for r in range(input_ids.shape[0]):
            ids = input_ids[r][attention_mask[r].bool()].tolist()
            text = self.tok.decode(ids, skip_special_tokens=True)
            rest = next((t[len(text) :] for t in self.truths.values() if t.startswith(text)), " ?")
            nxt = self.tok(rest or " .", add_special_tokens=False)["input_ids"][0]
            out[r, 0, nxt] = 0.0
        return SimpleNamespace(logits=out)


@pytest.fixture(scope="module")
def toks():
    return build_tiny("tiny-gpt2-a")[1], build_tiny("tiny-llama-a")[1]


PROMPTS = ["The river flows north", "Paris is the capital"]
TRUTH = {
    "a": "The river flows north through the valley and into the sea.",
    "b": "Paris is the capital of France, and a big city.",
}


def test_next_word_and_word_ends():
    assert next_word(" Paris is") == ("paris", True)
    assert next_word(" Par") == ("par", False)
    assert next_word("\n, and") == (",", True)
    assert next_word("东京") == ("东", True)
    assert next_word("   ") == ("", False)
    assert word_ends("The cat  sat.") == [3, 7, 13]
    assert word_ends("在东京 ok") == [1, 2, 3, 6]


def test_two_oracles_of_one_text_agree_across_vocabularies(toks):
    ga, la = toks
    assert ga.get_vocab() != la.get_vocab()
    a, b = Oracle(ga, TRUTH), Oracle(la, TRUTH)
    res = word_agreement(a, ga, b, la, PROMPTS)
    assert res["level"] == "word" and res["score"] == 1.0
    # every word end where both tokenisations cut (here: all 4 + 4 words)
    assert res["n_positions"] == 8 and res["per_prompt"] == [1.0, 1.0]


def test_an_edited_text_disagrees_exactly_where_its_next_word_changes(toks):
    ga, la = toks
    edited = dict(TRUTH, b="Paris is a capital of France, and a big city.")
    res = word_agreement(Oracle(ga, TRUTH), ga, Oracle(la, edited), la, PROMPTS)
    # the second prompt's prefixes: "Paris" -> "is" (same), "Paris is" -> "the" vs "a" (differ),
    # "Paris is the" -> the edited oracle has no such text and answers "?" (differ), then "capital"
    # -> "of" vs "?" (differ): 1 of 4 agree there, all 4 in the first prompt
    assert res["per_prompt"] == [1.0, 0.25]
    assert res["score"] == pytest.approx(5 / 8)


def test_alignment_score_takes_the_word_level_across_tokenizers_and_says_so(toks):
    ga, la = toks
    ma, _ = build_tiny("tiny-gpt2-a")
    mb, _ = build_tiny("tiny-llama-b")
    res = alignment_score(ma, ga, mb, la, PROMPTS)
    assert res["level"] == "word" and 0.0 <= res["score"] <= 1.0 and res["n_positions"] == 8
    assert alignment_score(ma, ga, mb, la, PROMPTS) == res  # deterministic, and cached
    same = alignment_score(ma, ga, ma, ga, PROMPTS)
    assert same["level"] == "token" and same["score"] == 1.0


def test_the_oracle_batching_does_not_change_the_answer(toks):
    ga, la = toks
    a, b = Oracle(ga, TRUTH), Oracle(la, TRUTH)
    one = word_agreement(a, ga, b, la, PROMPTS, batch=1)
    calls = b.calls
    b.calls = 0
    big = word_agreement(a, ga, b, la, PROMPTS, batch=1000)
    assert one == big and b.calls < calls  # one batch: a pass per greedy step, not per prefix


def test_no_shared_boundary_is_refused_in_one_line(toks):
    ga, la = toks
    with pytest.raises(GraftError, match="no word"):
        word_agreement(Oracle(ga, TRUTH), ga, Oracle(la, TRUTH), la, ["   "])
