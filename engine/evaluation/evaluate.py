"""Evaluation primitives: perplexity, the prompting convention, and the helpers every evaluation
shares (device, padding, context length, EOS ids). Task scores (exact and graded) build on these in
:mod:`engine.evaluation.scoring`; :func:`word_diff` marks what changed between two generations.

Pure torch/transformers. Every function runs under ``torch.inference_mode`` with the model in
eval mode (dropout off) and restores each submodule's ``training`` flag afterwards, so the model
is never changed. Inputs are placed on ``device`` (default: the device of the model's first
parameter); the model itself is never moved.

Prompting convention, shared with :mod:`engine.adapters.donor` so that training and evaluation agree:
:func:`format_prompt` renders a question (chat template if the tokenizer has one), and the
reference answer continues it directly, with a separating space only when the prompt does not
already end in whitespace (:func:`answer_ids`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch.nn.functional as F

from ..core.errors import GraftError
from ..loading.tokens import DeviceLike, context_length, encode_text, frozen, model_device, pad_id, pad_right
from ..measure.budget import length_batches

# --------------------------------------------------------------------------------------------
# Perplexity


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
            ids, mask = pad_right(seqs, fill, dev)
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
