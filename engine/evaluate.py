"""Evaluation primitives: perplexity, exact task score and graded (probability) score.

Pure torch/transformers. Every function runs under ``torch.inference_mode`` with the model in
eval mode (dropout off) and restores each submodule's ``training`` flag afterwards, so the model
is never changed. Inputs are placed on ``device`` (default: the device of the model's first
parameter); the model itself is never moved.

Prompting convention, shared with :mod:`engine.donor` so that training and evaluation agree:
:func:`format_prompt` renders a question (chat template if the tokenizer has one), and the
reference answer continues it directly, with a separating space only when the prompt does not
already end in whitespace (:func:`answer_ids`).
"""
from __future__ import annotations

import math
import re
import unicodedata
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from .errors import GraftError

DeviceLike = Union[str, torch.device, None]


# --------------------------------------------------------------------------------------------
# Shared helpers


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode + inference mode for the duration; restores every submodule's training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, was_training in flags:
            m.training = was_training


def model_device(model: torch.nn.Module, device: DeviceLike = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def pad_id(tokenizer: Any) -> int:
    """A token id used only to fill padded positions (always masked, so its value is irrelevant)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config (de-duplicated)."""
    ids: list[int] = []
    candidates: list[Any] = [tokenizer.eos_token_id]
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        candidates.append(gen_cfg.eos_token_id)
    for c in candidates:
        for tid in c if isinstance(c, (list, tuple)) else [c]:
            if tid is not None and int(tid) not in ids:
                ids.append(int(tid))
    return ids


def context_length(model: Any, default: int = 1 << 20) -> int:
    """How many positions ``model`` can attend over (its config's ``max_position_embeddings``,
    ``n_positions`` or ``n_ctx``); ``default`` when the config names none. Every input Graft
    feeds a model is cut to this, so a very long text can never index past the position table."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def fit_prompt(ids: list[int], room: int) -> list[int]:
    """Keep the last ``room`` tokens of a prompt (its end is what the answer follows)."""
    if room < 1:
        raise GraftError(f"no room left for the prompt: the model's context is too short for {len(ids)} tokens")
    return ids if len(ids) <= room else ids[len(ids) - room:]


def _qa_pair(item: Any) -> tuple[str, str]:
    """(question, answer) from a QAItem-like object or a dict."""
    if isinstance(item, dict):
        return str(item["question"]), str(item["answer"])
    return str(item.question), str(item.answer)


def _batches(order: Sequence[int], size: int) -> Iterable[list[int]]:
    size = max(int(size), 1)
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


def _pad_right(seqs: list[list[int]], fill: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), fill, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _pad_left(seqs: list[list[int]], fill: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), fill, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


# --------------------------------------------------------------------------------------------
# Perplexity


def encode_text(tokenizer: Any, text: str, max_length: int = 256) -> list[int]:
    """Token ids of a plain text with the tokenizer's own special tokens, truncated to max_length."""
    return list(tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"])


def perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    device: DeviceLike = None,
    max_length: int = 256,
) -> dict[str, Any]:
    """Token-weighted perplexity over a list of texts.

    Each text is tokenised on its own (the tokenizer's own special tokens, truncated to
    ``max_length``); every token after the first is predicted from its prefix. With ``N`` the
    set of all predicted non-pad tokens over all texts,

        nll_mean = (1/|N|) * sum_{t in N} -log p(x_t | x_<t),    ppl = exp(nll_mean).

    ``per_text_nll[i]`` is the same mean restricted to text ``i`` (NaN for a text of a single
    token, which has nothing to predict). Padding is on the right and masked, and the model is
    causal, so a text's scores do not depend on what it is batched with (up to float noise).
    """
    texts = [str(t) for t in texts]
    if not texts:
        raise GraftError("no texts to score")
    dev = model_device(model, device)
    max_length = min(max_length, context_length(model))
    encoded = [encode_text(tokenizer, t, max_length) for t in texts]
    # Longest first: batches of similar length waste little compute on padding.
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    sums = [0.0] * len(texts)
    counts = [0] * len(texts)
    fill = pad_id(tokenizer)
    with frozen(model):
        for idx in _batches(order, batch_size):
            seqs = [encoded[i] for i in idx]
            if max(len(s) for s in seqs) < 2:
                continue
            ids, mask = _pad_right(seqs, fill, dev)
            logits = model(input_ids=ids, attention_mask=mask).logits
            for r, i in enumerate(idx):
                n = len(encoded[i])
                if n < 2:
                    continue
                # Row by row keeps the float32 log-softmax to one (len x vocab) slab at a time.
                nll = F.cross_entropy(logits[r, : n - 1].float(), ids[r, 1:n], reduction="none")
                sums[i] = float(nll.double().sum())
                counts[i] = n - 1
    total = sum(counts)
    if total == 0:
        raise GraftError("no tokens to score: every text is shorter than two tokens")
    nll_mean = sum(sums) / total
    return {
        "ppl": math.exp(nll_mean),
        "nll_mean": nll_mean,
        "n_tokens": total,
        "per_text_nll": [s / c if c else float("nan") for s, c in zip(sums, counts)],
    }


# --------------------------------------------------------------------------------------------
# Prompting


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, question: str) -> str:
    """The prompt text for a question.

    With a chat template: one user turn and the assistant generation prompt
    (``add_generation_prompt=True``). Without: ``"Question: {q}\\nAnswer:"``.
    """
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {question}\nAnswer:"


def encode_prompt(tokenizer: Any, question: str) -> list[int]:
    """Token ids of :func:`format_prompt`.

    A chat template already writes its special tokens as text, so the tokenizer must not add
    them again; a plain prompt gets the tokenizer's usual special tokens (e.g. a BOS).
    """
    text = format_prompt(tokenizer, question)
    return list(tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"])


def answer_ids(tokenizer: Any, question: str, answer: str) -> list[int]:
    """Token ids of the reference answer as a continuation of the prompt.

    The prompt and the answer are tokenised separately (so the prompt tokens are exactly those
    the model sees at generation time). The answer gets a leading space when the prompt ends in
    a non-space character (``"Answer:"`` -> ``" Paris"``, the form a model would generate), and
    none when the prompt already ends in whitespace (a chat template's ``"assistant\\n"``).
    """
    prompt = format_prompt(tokenizer, question)
    cont = answer if (not prompt or prompt[-1].isspace()) else " " + answer
    return list(tokenizer(cont, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------
# Exact task score


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> str:
    """Lowercase, delete punctuation (Unicode category P*), drop the articles a/an/the, collapse
    whitespace. ``"The Grey-Sentinel!"`` -> ``"greysentinel"``.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_matches(generation: str, reference: str) -> bool:
    """True when the normalised reference occurs in the normalised generation as whole words
    (so ``"red"`` does not match ``"bored"`` and ``"1784"`` does not match ``"17845"``).
    A reference that normalises to nothing (only punctuation or articles) is matched as a
    lowercase, whitespace-collapsed substring instead, so it is not trivially contained.
    """
    ref = normalise(reference)
    if ref:
        return f" {ref} " in f" {normalise(generation)} "
    raw = " ".join(reference.lower().split())
    return bool(raw) and raw in " ".join(generation.lower().split())


def generate_greedy(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 8,
    device: DeviceLike = None,
) -> list[str]:
    """Greedy continuations of :func:`format_prompt` for each question (left-padded batches).

    Decoding stops at an end-of-sequence token; the text is decoded without special tokens and
    stripped.
    """
    dev = model_device(model, device)
    max_new_tokens = max(1, min(int(max_new_tokens), context_length(model) - 1))
    room = context_length(model) - max_new_tokens
    prompts = [fit_prompt(encode_prompt(tokenizer, q), room) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    stops = eos_ids(model, tokenizer)
    fill = pad_id(tokenizer)
    # A fresh config: greedy, no sampling knobs inherited from the checkpoint.
    gen_cfg = GenerationConfig(
        max_new_tokens=int(max_new_tokens),
        do_sample=False,
        num_beams=1,
        pad_token_id=fill,
        eos_token_id=stops or None,
    )
    out: list[str] = [""] * len(prompts)
    with frozen(model):
        for idx in _batches(order, batch_size):
            ids, mask = _pad_left([prompts[i] for i in idx], fill, dev)
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            new = gen[:, ids.shape[1] :].tolist()
            for r, i in enumerate(idx):
                toks = new[r]
                for k, t in enumerate(toks):
                    if t in stops:
                        toks = toks[:k]
                        break
                out[i] = tokenizer.decode(toks, skip_special_tokens=True).strip()
    return out


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

    ``items`` are :class:`engine.data.QAItem` (or dicts with ``question``/``answer``). The
    greedy answer is generated after :func:`format_prompt`; containment is on whole words (see
    :func:`answer_matches`). Deterministic: greedy decoding, fixed batching order.
    """
    pairs = [_qa_pair(it) for it in items]
    if not pairs:
        raise GraftError("no question/answer items to score")
    gens = generate_greedy(
        model, tokenizer, [q for q, _ in pairs], max_new_tokens=max_new_tokens, batch_size=batch_size, device=device
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
    ``items[i]["token_probs"]`` the individual ``p(a_k | ...)``.
    """
    pairs = [_qa_pair(it) for it in items]
    if not pairs:
        raise GraftError("no question/answer items to score")
    dev = model_device(model, device)
    prompts = [encode_prompt(tokenizer, q) for q, _ in pairs]
    answers = [answer_ids(tokenizer, q, a) for q, a in pairs]
    for (q, a), ans in zip(pairs, answers):
        if not ans:
            raise GraftError(f"answer {a!r} to {q!r} tokenises to nothing")
    ctx = context_length(model)
    answers = [a[: max(ctx - 1, 1)] for a in answers]  # an answer longer than the context is scored on its start
    prompts = [fit_prompt(p, ctx - len(a)) for p, a in zip(prompts, answers)]
    seqs = [p + a for p, a in zip(prompts, answers)]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    token_probs: list[list[float]] = [[] for _ in seqs]
    fill = pad_id(tokenizer)
    with frozen(model):
        for idx in _batches(order, batch_size):
            ids, mask = _pad_right([seqs[i] for i in idx], fill, dev)
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


def word_diff(before: str, after: str) -> list[list[str]]:
    """Word-level difference of two generations as ``[op, text]`` runs, op in equal/delete/insert
    (a replacement is a delete then an insert). Words are compared without their whitespace, which
    stays with the word it follows: joining the ``equal`` and ``insert`` texts gives ``after``
    exactly, and ``equal`` + ``delete`` gives ``before`` up to whitespace."""
    import difflib

    a = re.findall(r"\S+\s*|\s+", before)
    b = re.findall(r"\S+\s*|\s+", after)
    key = lambda w: w.strip()  # noqa: E731 - compare words, not their trailing whitespace
    sm = difflib.SequenceMatcher(a=[key(w) for w in a], b=[key(w) for w in b], autojunk=False)
    runs: list[list[str]] = []

    def put(op: str, text: str) -> None:
        if not text:
            return
        if runs and runs[-1][0] == op:
            runs[-1][1] += text
        else:
            runs.append([op, text])

    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            put("equal", "".join(b[j1:j2]))
        else:
            put("delete", "".join(a[i1:i2]))
            put("insert", "".join(b[j1:j2]))
    return runs
