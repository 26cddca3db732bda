"""Interference check (docs/methods.md T12): what a transplant did to text it should have left alone.

Two models (T before, T' after) and one tokenizer, on a retained set of general texts:

* **retained perplexity** of both (:func:`engine.evaluation.evaluate.perplexity`: token-weighted, each text
  tokenised on its own with the tokenizer's special tokens) and its relative change
  ``ppl_change_fraction = ppl_after / ppl_before - 1``; per example the mean token loss (NLL)
  before and after and its change ``T' - T``;
* **locality** = share of retained prompts whose greedy continuation is unchanged. The prompt of
  a text is the first ``prompt_tokens`` tokens of its tokenisation (special tokens included, as
  the perplexity sees it; a shorter text is its own prompt); each model continues it greedily for
  ``max_new_tokens`` tokens (stopping at end-of-sequence), and the continuation counts as changed
  when the generated token ids differ. Prompts are batched identically for both models, so two
  identical models always give locality 1.

:func:`should_roll_back` turns a report into the automatic roll-back decision of the
conjugation transplant (operation 3): roll back when retained perplexity rose by more than the
user's threshold (or became non-finite), or, if asked, when locality fell below a floor.
Everything is deterministic (teacher forcing, greedy decoding, fixed batching order).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from ..core.errors import GraftError
from ..core.progress import Progress, silent
from ..loading.tokens import context_length
from .evaluate import perplexity
from .scoring import greedy_continuations

N_WORST = 5


def _num(x: Any) -> Optional[float]:
    """A finite float, or None (never NaN in a report)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _split_decode(tokenizer: Any, prompt: list[int], continuation: list[int]) -> tuple[str, str]:
    """Prompt and continuation as text. A prompt cut after a fixed number of tokens can end inside a
    character (a CJK character is several byte-level tokens): decoded alone it would end in U+FFFD
    and the continuation would start with one. The character's bytes are given to the continuation."""
    prompt_text = tokenizer.decode(prompt, skip_special_tokens=True)
    whole = tokenizer.decode(list(prompt) + list(continuation), skip_special_tokens=True)
    clean = prompt_text.rstrip("\ufffd")
    if whole.startswith(clean):
        return clean, whole[len(clean) :]
    return prompt_text, tokenizer.decode(continuation, skip_special_tokens=True)


def retained_prompts(
    tokenizer: Any, texts: Sequence[str], prompt_tokens: int, max_length: int
) -> list[list[int]]:
    """Token ids of each text's prompt: its first ``prompt_tokens`` tokens (special tokens included),
    at most ``max_length``."""
    limit = max(1, min(int(prompt_tokens), int(max_length)))
    return [
        list(tokenizer(t, add_special_tokens=True, truncation=True, max_length=limit)["input_ids"])[:limit]
        for t in texts
    ]


def interference(
    model_before: Any,
    model_after: Any,
    tokenizer: Any,
    retained_texts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    prompt_tokens: int = 16,
    batch_size: int = 8,
    max_length: int = 256,
    progress: Optional[Progress] = None,
) -> dict[str, Any]:
    """Interference of ``model_after`` (T') relative to ``model_before`` (T) on ``retained_texts``
    (module docstring). Both models must read ``tokenizer``'s ids.

    Returns ``ppl_before``, ``ppl_after``, ``ppl_change_fraction``, ``nll_before``, ``nll_after``,
    ``n_tokens``, ``locality``, ``n_prompts``, ``n_changed``, ``mean_loss_change``,
    ``max_loss_increase``, ``worst`` (indices of the most-hurt examples, worst first),
    ``prompt_tokens``, ``max_new_tokens`` and ``per_example``: ``[{text, loss_before, loss_after,
    loss_change, changed, prompt, before, after}]`` in text order (a loss is None for a text of
    one token, which has nothing to predict).
    """
    progress = progress or silent()
    texts = [str(t) for t in retained_texts if t and str(t).strip()]
    if not texts:
        raise GraftError("the retained set has no texts for the interference check")
    if max_new_tokens < 1 or prompt_tokens < 1:
        raise GraftError("the interference check needs max_new_tokens >= 1 and prompt_tokens >= 1")
    ctx = min(context_length(model_before), context_length(model_after))
    max_new = max(1, min(int(max_new_tokens), ctx - 1))
    progress(0.0, "retained perplexity of T")
    pb = perplexity(model_before, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    progress(0.25, "retained perplexity of T'")
    pa = perplexity(model_after, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    prompts = retained_prompts(tokenizer, texts, prompt_tokens, max(1, ctx - max_new))
    order = [i for i in range(len(prompts)) if prompts[i]]  # an empty prompt gets an empty continuation
    progress(0.5, "greedy continuations of T")
    gb = greedy_continuations(
        model_before, tokenizer, prompts, max_new_tokens=max_new, batch_size=batch_size, order=order
    )
    progress(0.75, "greedy continuations of T'")
    ga = greedy_continuations(
        model_after, tokenizer, prompts, max_new_tokens=max_new, batch_size=batch_size, order=order
    )
    rows = []
    changes = []
    n_prompts = n_changed = 0
    for i, t in enumerate(texts):
        lb, la = _num(pb["per_text_nll"][i]), _num(pa["per_text_nll"][i])
        dl = la - lb if lb is not None and la is not None else None
        has_prompt = bool(prompts[i])
        changed = has_prompt and gb[i] != ga[i]
        n_prompts += has_prompt
        n_changed += changed
        if dl is not None:
            changes.append((dl, i))
        prompt, before = _split_decode(tokenizer, prompts[i], gb[i])
        rows.append(
            {
                "text": t,
                "loss_before": lb,
                "loss_after": la,
                "loss_change": dl,
                "changed": bool(changed),
                "prompt": prompt,
                "before": before,
                "after": _split_decode(tokenizer, prompts[i], ga[i])[1],
            }
        )
    ppl_b, ppl_a = _num(pb["ppl"]), _num(pa["ppl"])
    frac = ppl_a / ppl_b - 1.0 if ppl_a is not None and ppl_b else None
    changes.sort(key=lambda c: (-c[0], c[1]))
    progress(1.0, "interference measured")
    return {
        "ppl_before": ppl_b,
        "ppl_after": ppl_a,
        "ppl_change_fraction": _num(frac),
        "nll_before": _num(pb["nll_mean"]),
        "nll_after": _num(pa["nll_mean"]),
        "n_tokens": int(pb["n_tokens"]),
        "locality": (n_prompts - n_changed) / n_prompts if n_prompts else None,
        "n_prompts": n_prompts,
        "n_changed": n_changed,
        "mean_loss_change": _num(sum(c[0] for c in changes) / len(changes)) if changes else None,
        "max_loss_increase": _num(changes[0][0]) if changes else None,
        "worst": [i for _, i in changes[:N_WORST]],
        "prompt_tokens": int(prompt_tokens),
        "max_new_tokens": max_new,
        "per_example": rows,
    }


def should_roll_back(
    report: dict[str, Any], max_increase: Optional[float], *, min_locality: Optional[float] = None
) -> tuple[bool, str]:
    """Whether to undo a transplant given its :func:`interference` report, and why (one line).

    Roll back when retained perplexity after is missing or not finite, when
    ``ppl_change_fraction > max_increase`` (e.g. 0.05 = retained perplexity up by more than 5%;
    ``None`` or a negative value turns this test off), or when ``min_locality`` is given and
    locality is below it."""
    ppl_b, ppl_a = report.get("ppl_before"), report.get("ppl_after")
    frac = report.get("ppl_change_fraction")
    if ppl_a is None or not math.isfinite(float(ppl_a)):
        return True, "retained perplexity after the transplant is not finite"
    change = (
        f"retained perplexity {ppl_b:.4g} -> {ppl_a:.4g} ({100 * frac:+.2f}%)"
        if frac is not None
        else f"retained perplexity after {ppl_a:.4g}"
    )
    if max_increase is not None and max_increase >= 0 and frac is not None and frac > max_increase:
        return True, f"{change}: past the {100 * max_increase:g}% threshold"
    loc = report.get("locality")
    if min_locality is not None and loc is not None and loc < min_locality:
        return True, f"locality {loc:.3f} is below the floor {min_locality:g} ({change})"
    limit = (
        f" within the {100 * max_increase:g}% threshold"
        if max_increase is not None and max_increase >= 0
        else ""
    )
    return False, f"{change}{limit}; locality {loc if loc is None else round(loc, 4)}"
