"""Tokens in and out of a loaded model: its device, padding, context length and EOS ids, plain-text
encoding, and the prompting convention every evaluation and the donor's training share.

Prompting convention: :func:`format_prompt` renders a question (chat template if the tokenizer has
one), and the reference answer continues it directly, with a separating space only when the
prompt does not already end in whitespace (:func:`answer_ids`).
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence, Union

import torch

from ..core.errors import GraftError

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
        raise GraftError(
            f"no room left for the prompt: the model's context is too short for {len(ids)} tokens"
        )
    return ids if len(ids) <= room else ids[len(ids) - room :]


def qa_pair(item: Any) -> tuple[str, str]:
    """(question, answer) from a QAItem-like object or a dict."""
    if isinstance(item, dict):
        return str(item["question"]), str(item["answer"])
    return str(item.question), str(item.answer)


def batches(order: Sequence[int], size: int) -> Iterable[list[int]]:
    size = max(int(size), 1)
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


def pad_right(seqs: list[list[int]], fill: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), fill, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_left(seqs: list[list[int]], fill: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), fill, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def encode_text(tokenizer: Any, text: str, max_length: int = 256) -> list[int]:
    """Token ids of a plain text with the tokenizer's own special tokens, truncated to max_length."""
    return list(tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"])


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
# Vocabularies


_VOCABS: dict[int, tuple[Any, int, dict[str, int]]] = {}  # id(tokenizer) -> (weakref, len, vocab)
_VOCABS_LOCK = threading.Lock()


def tokenizer_vocab(tok: Any) -> dict[str, int]:
    """``tok.get_vocab()``, memoised per tokenizer object and size (a 49k vocabulary takes about
    20 ms to build, and T1 needs each twice). Treat the dict as read-only."""
    size = len(tok)
    with _VOCABS_LOCK:
        hit = _VOCABS.get(id(tok))
        if hit is not None and hit[0]() is tok and hit[1] == size:
            return hit[2]
    vocab = tok.get_vocab()
    try:
        ref = weakref.ref(tok)
    except TypeError:  # an object without weak references: not memoised
        return vocab
    with _VOCABS_LOCK:
        for key in [k for k, v in _VOCABS.items() if v[0]() is None]:
            del _VOCABS[key]
        _VOCABS[id(tok)] = (ref, size, vocab)
    return vocab


def same_tokenizer(a: Any, b: Any) -> bool:
    """True when both tokenizers map every string to the same ids (same vocabulary)."""
    if a is b:
        return True
    try:
        return len(a) == len(b) and tokenizer_vocab(a) == tokenizer_vocab(b)
    except (AttributeError, TypeError, NotImplementedError):
        return False
