"""Task scores of a model on question/answer items: exact (greedy generation matched to the
reference, :func:`task_score`) and graded (the teacher-forced probability of the reference,
:func:`graded_score`).

Same conventions as :mod:`engine.evaluation.evaluate`, whose primitives these use: the model runs under
``torch.inference_mode`` in eval mode and is never changed; prompts follow
:func:`engine.loading.tokens.format_prompt`, answers :func:`engine.loading.tokens.answer_ids`.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Optional, Sequence

import torch
from transformers import GenerationConfig

from ..core.errors import GraftError
from ..loading.tokens import (
    DeviceLike,
    answer_ids,
    batches,
    context_length,
    encode_prompt,
    eos_ids,
    fit_prompt,
    frozen,
    model_device,
    pad_id,
    pad_left,
    pad_right,
    qa_pair,
)
from ..measure.align import UNSPACED_CHAR
from ..measure.budget import length_batches

# --------------------------------------------------------------------------------------------
# Exact task score


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # 1,000 -> 1000 (not 3,14)
_DECIMAL = re.compile(r"(?<=\d)[.](?=\d)")  # 3.14 stays one number (kept as a digit-dot-digit run)
_DOT = "\ue000"  # a private-use stand-in for the kept decimal point while punctuation is removed


def normalise(text: str) -> str:
    """Case-fold and compare-ready: NFKC (full-width forms, ligatures), ``casefold`` (ß = ss),
    accents of Latin, Greek and Cyrillic letters removed (São = Sao, İzmir = izmir; the marks of
    other scripts are kept, they change the word there), invisible format characters (zero-width
    space, soft hyphen) removed, thousands separators removed (1,000 = 1000) while a decimal point
    stays (3.14 is not 314), every other punctuation mark a word break (Grey-Sentinel = Grey
    Sentinel, Kessaloon's contains Kessaloon), the articles a/an/the dropped, whitespace collapsed.
    ``"The Grey-Sentinel!"`` -> ``"grey sentinel"``.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    out = []
    for ch in unicodedata.normalize("NFD", text):
        if (
            unicodedata.combining(ch) and out and ord(out[-1]) < 0x0530
        ):  # an accent on a Latin/Greek/Cyrillic letter
            continue
        out.append(ch)
    text = unicodedata.normalize("NFC", "".join(out))
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    text = _DECIMAL.sub(_DOT, _THOUSANDS.sub("", text))
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text).replace(_DOT, ".")
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_matches(generation: str, reference: str) -> bool:
    """True when the normalised reference occurs in the normalised generation as whole words
    (so ``"red"`` does not match ``"bored"`` and ``"1784"`` does not match ``"17845"``); as a plain
    substring when the reference is written in a script without spaces between words (Chinese,
    Japanese, Thai...: ``"东京"`` in ``"首都是东京。"``). A reference that normalises to nothing (only
    punctuation or articles) must appear as a whole whitespace-separated token of the generation
    (case-folded), so ``":"`` is not found in ``"::::"`` nor ``"a"`` in ``"cat"``.
    """
    ref = normalise(reference)
    if ref:
        gen = normalise(generation)
        if UNSPACED_CHAR.search(ref):  # a script without spaces between words: no whole words to match
            return ref in gen
        return f" {ref} " in f" {gen} "
    raw = " ".join(reference.casefold().split())
    return bool(raw) and f" {raw} " in f" {' '.join(generation.casefold().split())} "


def greedy_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    device: DeviceLike = None,
    order: Optional[Sequence[int]] = None,
) -> list[list[int]]:
    """Greedy continuation token ids of each prompt, cut at the first end-of-sequence token.

    The prompts (token ids) go to the model in left-padded batches of ``batch_size``, taken in
    ``order`` (indices into ``prompts``; default: prompt order); a prompt not in ``order`` gets an
    empty continuation. A fresh generation config: greedy, no sampling knobs inherited from the
    checkpoint.
    """
    dev = model_device(model, device)
    stops = eos_ids(model, tokenizer)
    fill = pad_id(tokenizer)
    cfg = GenerationConfig(
        max_new_tokens=int(max_new_tokens),
        do_sample=False,
        num_beams=1,
        pad_token_id=fill,
        eos_token_id=stops or None,
    )
    out: list[list[int]] = [[] for _ in prompts]
    with frozen(model):
        for idx in batches(range(len(prompts)) if order is None else order, batch_size):
            ids, mask = pad_left([list(prompts[i]) for i in idx], fill, dev)
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
            new = gen[:, ids.shape[1] :].tolist()
            for r, i in enumerate(idx):
                toks = new[r]
                for k, t in enumerate(toks):
                    if t in stops:
                        toks = toks[:k]
                        break
                out[i] = toks
    return out


def generate_greedy(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 8,
    device: DeviceLike = None,
) -> list[str]:
    """Greedy continuations of :func:`format_prompt` for each question (left-padded batches,
    longest prompt first).

    Decoding stops at an end-of-sequence token; the text is decoded without special tokens and
    stripped, with a character cut by the token budget dropped (a trailing U+FFFD: its remaining
    bytes were never generated).
    """
    max_new_tokens = max(1, min(int(max_new_tokens), context_length(model) - 1))
    room = context_length(model) - max_new_tokens
    prompts = [fit_prompt(encode_prompt(tokenizer, q), room) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    toks = greedy_continuations(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
        order=order,
    )
    return [tokenizer.decode(t, skip_special_tokens=True).rstrip("\ufffd").strip() for t in toks]


def task_score(
    model: Any,
    tokenizer: Any,
    items: Sequence[Any],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 8,
    device: DeviceLike = None,
) -> dict[str, Any]:
    """Exact task score ``S = (1/n) * sum_i [normalise(ref_i) in normalise(greedy_i)]``.

    ``items`` are :class:`engine.core.data.QAItem` (or dicts with ``question``/``answer``). The
    greedy answer is generated after :func:`format_prompt`; containment is on whole words (see
    :func:`answer_matches`). Deterministic: greedy decoding, fixed batching order.
    """
    pairs = [qa_pair(it) for it in items]
    if not pairs:
        raise GraftError("no question/answer items to score")
    gens = generate_greedy(
        model,
        tokenizer,
        [q for q, _ in pairs],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
    )
    rows = [
        {"question": q, "answer": a, "generation": g, "correct": answer_matches(g, a)}
        for (q, a), g in zip(pairs, gens)
    ]
    return {"score": sum(r["correct"] for r in rows) / len(rows), "n": len(rows), "items": rows}


# --------------------------------------------------------------------------------------------
# Graded score


def graded_score(
    model: Any,
    tokenizer: Any,
    items: Sequence[Any],
    *,
    batch_size: int = 8,
    device: DeviceLike = None,
) -> dict[str, Any]:
    """Graded score: mean over items of the mean per-token probability of the reference answer.

    For item ``i`` with prompt tokens ``p`` (:func:`encode_prompt`) and answer tokens
    ``a_1..a_m`` (:func:`answer_ids`), teacher-forced:

        g_i = (1/m) * sum_k p(a_k | p, a_<k),     score = (1/n) * sum_i g_i.

    It lies in (0, 1], equals 1 only if the model is certain of every answer token, and moves
    smoothly while the exact task score is still 0. ``items[i]["prob"]`` is ``g_i``;
    ``items[i]["token_probs"]`` the individual ``p(a_k | ...)``. Prompt and answer longer than the
    model's context together: the answer is scored on its first tokens, and the prompt keeps all of
    itself or at least its last ``ctx // 2`` tokens; ``len(token_probs)`` says how much was scored.
    """
    pairs = [qa_pair(it) for it in items]
    if not pairs:
        raise GraftError("no question/answer items to score")
    dev = model_device(model, device)
    prompts = [encode_prompt(tokenizer, q) for q, _ in pairs]
    answers = [answer_ids(tokenizer, q, a) for q, a in pairs]
    for (q, a), ans in zip(pairs, answers):
        if not ans:
            raise GraftError(f"answer {a!r} to {q!r} tokenises to nothing")
    ctx = context_length(model)
    # An answer too long for the context is scored on its start, leaving the prompt's end at least
    # half the context (or all of the prompt), so the question still conditions what is scored.
    answers = [a[: max(ctx - min(len(p), ctx // 2), 1)] for p, a in zip(prompts, answers)]
    prompts = [fit_prompt(p, ctx - len(a)) for p, a in zip(prompts, answers)]
    seqs = [p + a for p, a in zip(prompts, answers)]
    token_probs: list[list[float]] = [[] for _ in seqs]
    fill = pad_id(tokenizer)
    with frozen(model):
        for idx in length_batches([len(x) for x in seqs], batch_size):
            ids, mask = pad_right([seqs[i] for i in idx], fill, dev)
            logits = model(input_ids=ids, attention_mask=mask).logits
            for r, i in enumerate(idx):
                start, end = len(prompts[i]), len(seqs[i])
                # Position t-1 predicts token t: answer tokens sit at start..end-1.
                logp = torch.log_softmax(logits[r, start - 1 : end - 1].float(), dim=-1)
                tgt = ids[r, start:end]
                token_probs[i] = logp.gather(-1, tgt[:, None]).squeeze(-1).exp().tolist()
    rows = [
        {"question": q, "answer": a, "prob": sum(tp) / len(tp), "token_probs": tp}
        for (q, a), tp in zip(pairs, token_probs)
    ]
    return {"score": sum(r["prob"] for r in rows) / len(rows), "n": len(rows), "items": rows}
