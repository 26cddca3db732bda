"""Agreement of two models' greedy next-word predictions, for models with different tokenizers
(docs/methods.md T11, "alignment score").

Greedy next *tokens* of two vocabularies cannot be compared one to one, but the words they spell
can. For every word of a prompt (whitespace-delimited, or a character in scripts written without
spaces; the same rule as the row alignment, :mod:`engine.measure.align`), each model reads the
prompt up to the end of that word and continues greedily until its continuation holds a complete
next word (at most :data:`MAX_WORD_TOKENS` tokens). The two next words are compared after Unicode
case folding; a position counts only where both tokenisations have a token boundary at the word's
end. ``score = agreeing positions / counted positions``.

The prompt is the plain question (with the tokenizer's usual special tokens, e.g. a BOS): the chat
templates of two families differ, and so would the text the words are cut from.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Sequence

import torch

from ..core.errors import GraftError
from ..loading.tokens import context_length, model_device, pad_id
from ..measure.align import UNSPACED_CHAR, word_spans

MAX_WORD_TOKENS = 6  # greedy tokens per position at most; a longer word is compared as far as it got
_LEAD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def word_ends(text: str) -> list[int]:
    """Character offset of the end of every word (:func:`engine.measure.align.word_spans`)."""
    return [b for _, b in word_spans(text)]


def next_word(continuation: str) -> tuple[str, bool]:
    """The first word of a greedy continuation (a run of word characters, a single punctuation mark,
    or a single character of an unspaced script), case-folded, and whether it is complete (something
    follows it)."""
    s = continuation.lstrip()
    if not s:
        return "", False
    if UNSPACED_CHAR.match(s[0]):
        return s[0].casefold(), True
    m = _LEAD.match(s)
    w = m.group(0) if m else s[0]
    if UNSPACED_CHAR.search(w):  # a word run into an unspaced script: cut before it
        w = w[: UNSPACED_CHAR.search(w).start()] or w[0]
    return w.casefold(), len(s) > len(w)


def _cut_points(tokenizer: Any, text: str) -> tuple[list[int], dict[int, int]]:
    """Token ids of ``text`` (with the usual special tokens) and, for every character offset that
    ends a token, the index of the last token ending there."""
    if not getattr(tokenizer, "is_fast", False):
        raise GraftError(
            "the word-level alignment score needs fast tokenizers (character offsets) on both models"
        )
    enc = tokenizer(text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    at: dict[int, int] = {}
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a:
            at[int(b)] = t
    return ids, at


@torch.inference_mode()
def _continue(
    model: torch.nn.Module, tokenizer: Any, prefixes: list[list[int]], batch: int = 16
) -> list[str]:
    """The greedy continuation of every prefix, decoded, up to :data:`MAX_WORD_TOKENS` tokens,
    stopping once every continuation of a batch holds a complete word. Prefixes are left-padded,
    with position ids from the mask, so each runs as it would alone."""
    dev = model_device(model)
    fill = pad_id(tokenizer)
    # only the last position's logits, where the model supports it (a batch of every prefix would
    # otherwise hold batch x length x vocabulary floats)
    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out: list[str] = []
    for s in range(0, len(prefixes), batch):
        chunk = prefixes[s : s + batch]
        T = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), T), fill, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, T - len(p) :] = torch.tensor(p)
            mask[r, T - len(p) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        gen: list[list[int]] = [[] for _ in chunk]
        for _ in range(MAX_WORD_TOKENS):
            pos = (mask.cumsum(1) - 1).clamp_min(0)
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **last
            ).logits
            nxt = logits[:, -1].argmax(-1)
            for r in range(len(chunk)):
                gen[r].append(int(nxt[r]))
            ids = torch.cat([ids, nxt.unsqueeze(1)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if all(next_word(tokenizer.decode(g))[1] for g in gen):
                break
        out.extend(tokenizer.decode(g) for g in gen)
    return out


def word_agreement(
    donor_model: torch.nn.Module,
    donor_tok: Any,
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    batch: int = 16,
) -> dict[str, Any]:
    """``{score, n_positions, per_prompt, level: "word"}``: agreement of the two models' greedy
    next words at every word end of every prompt that both tokenisations can cut at."""
    room = min(context_length(donor_model), context_length(model))
    sides = []
    for net, tk in ((donor_model, donor_tok), (model, tok)):
        sides.append((net, tk, [_cut_points(tk, p) for p in prompts]))
    jobs: list[tuple[int, int]] = []  # (prompt, character offset)
    for k, p in enumerate(prompts):
        ends = word_ends(p)
        for e in ends:
            if all(e in cuts[k][1] and cuts[k][1][e] < room for _, _, cuts in sides):
                jobs.append((k, e))
    if not jobs:
        raise GraftError("no word of the prompts ends on a token boundary of both tokenizers")
    words = []
    for net, tk, cuts in sides:
        prefixes = [cuts[k][0][: cuts[k][1][e] + 1] for k, e in jobs]
        words.append([next_word(c)[0] for c in _continue(net, tk, prefixes, batch)])
    same = [a == b and a != "" for a, b in zip(*words)]
    per: list[float] = []
    for k in range(len(prompts)):
        mine = [s for (j, _), s in zip(jobs, same) if j == k]
        if mine:
            per.append(sum(mine) / len(mine))
    return {"score": sum(same) / len(same), "n_positions": len(same), "per_prompt": per, "level": "word"}
