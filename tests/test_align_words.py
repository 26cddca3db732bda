"""Word alignment across tokenizers: the vectorised row -> word assignment equals the plain rule
(most character overlap, first word on a tie, -1 when a row overlaps no word) on hostile texts."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from engine.loading.models import ModelSpec, load_model
from engine.measure.align import _WORD, _pool, _word_ids, ordered_add

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "",
    "   leading and trailing spaces   ",
    "naïve café — Zürich, 東京 and emoji 🌿🌿 mixed",
    "a" * 300,
    "tabs\tand\nnewlines\n\n between words",
    "x",
    "punctuation!!! ... ??? ,,, ;;;",
]


def reference(cap) -> torch.Tensor:
    """The rule, written as a loop over rows and words."""
    starts = [[(m.start(), m.end()) for m in _WORD.finditer(t)] for t in cap.texts]
    base = [0]
    for s in starts:
        base.append(base[-1] + len(s))
    out = torch.full((cap.n,), -1, dtype=torch.long)
    for r in range(cap.n):
        ti = int(cap.text_index[r])
        a, b = int(cap.offsets[r, 0]), int(cap.offsets[r, 1])
        best, best_ov = -1, 0
        for wi, (ws, we) in enumerate(starts[ti]):
            ov = min(b, we) - max(a, ws)
            if ov > best_ov:
                best, best_ov = wi, ov
        if best >= 0:
            out[r] = base[ti] + best
    return out


def capture_of(tokenizer, texts) -> SimpleNamespace:
    index, offsets = [], []
    for ti, text in enumerate(texts):
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        for a, b in enc["offset_mapping"]:
            index.append(ti)
            offsets.append((a, b))
    return SimpleNamespace(
        texts=texts,
        text_index=torch.tensor(index, dtype=torch.long),
        offsets=torch.tensor(offsets, dtype=torch.long).reshape(-1, 2),
        n=len(index),
    )


def test_word_ids_match_the_rule_on_real_tokenizers():
    for name in ("tiny-gpt2-a", "tiny-llama-b"):
        tok = load_model(ModelSpec.parse(name)).tokenizer
        cap = capture_of(tok, TEXTS)
        got = _word_ids(cap)
        assert torch.equal(got, reference(cap)), name
        assert (got >= 0).any() and (got == -1).any()  # both cases occur


def test_word_ids_match_the_rule_on_random_spans():
    rng = random.Random(0)
    texts = [
        " ".join(
            "".join(rng.choice("ab ,") for _ in range(rng.randint(0, 8))) for _ in range(rng.randint(0, 30))
        )
        for _ in range(40)
    ]
    index, offsets = [], []
    for ti, t in enumerate(texts):
        for _ in range(rng.randint(0, 25)):
            a = rng.randint(0, len(t))
            index.append(ti)
            offsets.append((a, rng.randint(a, len(t))))
    cap = SimpleNamespace(
        texts=texts,
        text_index=torch.tensor(index, dtype=torch.long),
        offsets=torch.tensor(offsets, dtype=torch.long).reshape(-1, 2),
        n=len(index),
    )
    assert torch.equal(_word_ids(cap), reference(cap))


def test_scripts_without_spaces_pool_per_character_not_per_sentence(tmp_path):
    """A Chinese or Japanese sentence has no spaces: pooled per whitespace run it was one row per text
    (6 rows for 6 texts; CKA of unrelated models then 0.93). Each character is a word there."""
    from engine.loading.models import ModelStore
    from engine.running.runner import run_tool

    texts = [
        "首都是东京，人口很多。",
        "富士山は日本で一番高い山です。",
        "他说图书馆早上九点开门。",
        "Paris est la capitale 和 Berlin。",
    ]
    assert _WORD.findall(texts[3]) == ["Paris", "est", "la", "capitale", "和", "Berlin", "。"]
    wl = tmp_path / "cjk.txt"
    wl.write_text("\n".join(texts) + "\n", encoding="utf-8")
    store = ModelStore()
    d, t = store.get(ModelSpec.parse("tiny-gpt2-a"), "cpu"), store.get(ModelSpec.parse("tiny-llama-a"), "cpu")
    r = run_tool("cka", d, t, {"workload": str(wl)})
    assert r["result"]["alignment"] == "word"
    n_chars = (
        sum(len([c for c in s if not c.isspace()]) for s in texts)
        - len("Parisestlacapitale")
        - len("Berlin")
        + 6
    )
    assert r["result"]["n_rows"] >= 0.8 * n_chars  # about one row per character (a few may be outliers)


def _id_cases():
    g = torch.Generator().manual_seed(0)
    for n, groups in [(1, 1), (7, 3), (500, 40), (2048, 1437), (300, 1)]:
        ids = torch.randint(-1, groups, (n,), generator=g)  # unsorted, with dropped rows (-1)
        yield ids, groups
    yield torch.zeros(300, dtype=torch.long), 1  # one 300-token word ("a" * 300)
    yield -torch.ones(5, dtype=torch.long), 2  # every row dropped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ordered_add_is_index_add_to_the_bit(dtype):
    """Word pooling's sums on CUDA (ordered_add, run here on the CPU) are the CPU's index_add_,
    bit for bit: the same additions in the same order, so the pooled rows do not depend on the device's
    scheduling."""
    g = torch.Generator().manual_seed(1)
    for ids, groups in _id_cases():
        keep = ids >= 0
        src = (torch.randn(3, int(keep.sum()), 16, generator=g) * 100).to(dtype)
        idx = ids[keep]
        a = torch.zeros(3, groups, 16, dtype=dtype).index_add_(1, idx, src)
        b = torch.zeros(3, groups, 16, dtype=dtype)
        ordered_add(b, idx, src, torch.bincount(idx, minlength=groups))
        assert torch.equal(a, b), (len(ids), groups)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_word_pooling_on_cuda_is_the_same_every_run_and_equals_the_cpu():
    for ids, groups in _id_cases():
        resid = torch.randn(4, len(ids), 64, generator=torch.Generator().manual_seed(len(ids))) * 50
        cpu, _ = _pool(resid, ids, groups)
        runs = [_pool(resid.cuda(), ids, groups)[0].cpu() for _ in range(3)]
        assert all(torch.equal(runs[0], r) for r in runs[1:])
        assert torch.equal(runs[0], cpu)
