"""Training data of :func:`engine.adapters.donor.make_donor`: (input_ids, labels) examples from a concept
set's facts and QA items (:func:`build_examples`) or from plain texts (:func:`text_examples`), which
examples each step trains on with replay mixed in (:func:`batch_plan`), and one padded batch
(:func:`collate`). Prompts and answers are tokenised as the evaluation reads them
(:func:`engine.loading.tokens.encode_prompt`, :func:`engine.loading.tokens.answer_ids`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..core.data import ConceptSet
from ..core.errors import GraftError
from ..loading.tokens import answer_ids, encode_prompt, encode_text


def build_examples(
    tokenizer: Any, concept: ConceptSet, max_length: int, train_on_qa: bool = False
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) pairs: every fact, then (if ``train_on_qa``) every train-split QA item.

    Facts are plain causal-LM texts followed by EOS (loss on every predicted token). A QA item is
    ``format_prompt(question)`` + answer + EOS with the loss only on the answer and the EOS (the
    prompt is label -100), which teaches answering without teaching the model to reproduce the
    prompt. The answer tokens are exactly those the graded score measures.
    """
    eos = tokenizer.eos_token_id
    tail = [int(eos)] if eos is not None else []
    examples = text_examples(tokenizer, concept.facts, max_length)
    for item in concept.train_qa() if train_on_qa else ():
        prompt = encode_prompt(tokenizer, item.question)
        answer = answer_ids(tokenizer, item.question, item.answer) + tail
        ids = (prompt + answer)[:max_length]
        labels = ([-100] * len(prompt) + answer)[:max_length]
        examples.append((ids, labels))
    examples = [e for e in examples if sum(l != -100 for l in e[1][1:]) > 0]
    if not examples:
        what = "facts or train questions" if train_on_qa else "facts"
        raise GraftError(f"concept set {concept.name} has no {what} to learn from")
    return examples


def text_examples(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Plain causal-LM examples: each text + EOS, loss on every predicted token. Texts with
    nothing to predict (a single token) are dropped."""
    eos = tokenizer.eos_token_id
    tail = [int(eos)] if eos is not None else []
    out: list[tuple[list[int], list[int]]] = []
    for text in texts:
        ids = (encode_text(tokenizer, text, max_length) + tail)[:max_length]
        if len(ids) >= 2:
            out.append((ids, list(ids)))
    return out


def batch_plan(
    n_concept: int, n_replay: int, steps: int, batch_size: int, replay_fraction: float, seed: int
) -> list[list[tuple[str, int]]]:
    """Which examples each step trains on: ``[("concept", i) | ("replay", j), ...]`` per step.

    Step ``s`` takes ``floor((s+1)*b*f) - floor(s*b*f)`` replay examples (``b`` the batch size,
    ``f`` the replay fraction), so the long-run share is exactly ``f``, and fills the rest of the
    batch with concept examples. Each source is consumed in epochs of its own seeded permutation;
    the concept stream uses the same generator as a run without replay, so ``f = 0`` (or no
    replay set) reproduces a facts-only run exactly.
    """
    gen = torch.Generator().manual_seed(seed)
    gen_replay = torch.Generator().manual_seed(seed + 7919)
    order: list[int] = []
    order_replay: list[int] = []
    f = replay_fraction if n_replay > 0 else 0.0
    plan: list[list[tuple[str, int]]] = []
    for step in range(steps):
        k = math.floor((step + 1) * batch_size * f + 1e-9) - math.floor(step * batch_size * f + 1e-9)
        k = min(k, batch_size - 1)  # at least one concept example per batch
        while len(order) < batch_size - k:
            order += torch.randperm(n_concept, generator=gen).tolist()
        while len(order_replay) < k:
            order_replay += torch.randperm(n_replay, generator=gen_replay).tolist()
        batch = [("concept", i) for i in order[: batch_size - k]] + [("replay", j) for j in order_replay[:k]]
        order, order_replay = order[batch_size - k :], order_replay[k:]
        plan.append(batch)
    return plan


def collate(batch: list[tuple[list[int], list[int]]], fill: int, device: torch.device):
    """One batch as ``(input_ids, attention_mask, labels)`` on ``device``, right-padded with ``fill``
    (labels with -100)."""
    width = max(len(ids) for ids, _ in batch)
    ids_t = torch.full((len(batch), width), fill, dtype=torch.long)
    lab_t = torch.full((len(batch), width), -100, dtype=torch.long)
    mask_t = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (ids, labels) in enumerate(batch):
        ids_t[r, : len(ids)] = torch.tensor(ids)
        lab_t[r, : len(labels)] = torch.tensor(labels)
        mask_t[r, : len(ids)] = 1
    return ids_t.to(device), mask_t.to(device), lab_t.to(device)
