"""Evaluation primitives: perplexity, the prompting convention, and the helpers every evaluation
shares (device, padding, context length, EOS ids). Task scores (exact and graded) build on these in
:mod:`engine.scoring`; :func:`word_diff` marks what changed between two generations.

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
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence, Union

import torch
import torch.nn.functional as F

from .budget import length_batches
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
        ids[r, : len(s)] = torch.as_tensor(s, dtype=torch.long)
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
    sums = [0.0] * len(texts)
    counts = [0] * len(texts)
    fill = pad_id(tokenizer)
    with frozen(model):
        for idx in length_batches([len(e) for e in encoded], batch_size):  # little padding
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
