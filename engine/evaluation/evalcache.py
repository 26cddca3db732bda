"""Before/after evaluation of a model state (docs/methods.md T11), cached by weight hash.

:func:`evaluate_model` measures one model state on a concept set and a retained set:

* ``ppl_concept``: token-weighted perplexity (:func:`engine.evaluation.evaluate.perplexity`) on the concept
  facts (the concept's evaluation texts; a set without facts falls back to its test questions
  rendered as ``"question answer"``);
* ``ppl_retained``: the same on every text of the retained set (:meth:`ConceptSet.texts`);
* ``task_score_exact``: share of the concept's held-out *test* questions whose greedy answer
  contains the normalised reference (:func:`engine.evaluation.scoring.answer_matches`);
* ``task_score_graded``: mean per-token probability of the reference answer on the same items
  (:func:`engine.evaluation.scoring.graded_score`);
* ``task_score``: the one of the two chosen by ``score``.

:func:`alignment_score` is the agreement of greedy next-token predictions of two models over
the prompt positions, with one tokenizer; across different tokenizers, whose greedy next tokens
live in different vocabularies, it is the agreement of greedy next words at every word end
(:mod:`engine.evaluation.word_agreement`), and says which (``level``).

:func:`generations` gives greedy answers after :func:`engine.loading.tokens.format_prompt` (chat template).

Every result is cached in-process, keyed by (weight hash of the model state, tokenizer
fingerprint, device, sha256 of the evaluated texts, parameters), so a state is never evaluated
twice: a sweep point with K = 0, or a transplant that reproduces the donor exactly, reuses the
earlier numbers. Hashing the texts themselves (not the file) also covers sets built in memory.
All computations are deterministic (greedy decoding, teacher forcing, fixed batching).
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import torch

from ..core.data import ConceptSet, texts_sha256
from ..core.errors import GraftError
from ..core.params import SCORES  # noqa: E402  (one definition, with the parameter groups)
from ..core.progress import Progress, silent
from ..loading.models import state_dict_hash
from ..loading.tokens import context_length, encode_prompt, fit_prompt, frozen, model_device
from .evaluate import perplexity
from .scoring import answer_matches, generate_greedy, graded_score

MAX_ENTRIES = 512

_CACHE: "OrderedDict[tuple, Any]" = OrderedDict()
_LOCK = threading.Lock()
_STATS = {"hits": 0, "misses": 0}
_TOK_FP: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def clear_cache() -> None:
    """Forget every cached evaluation (tests, or after editing a dataset file in place)."""
    with _LOCK:
        _CACHE.clear()
        _STATS.update(hits=0, misses=0)


def cache_info() -> dict[str, int]:
    with _LOCK:
        return {"entries": len(_CACHE), **_STATS}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides the token ids: class, vocabulary, special tokens and chat template."""
    try:
        hit = _TOK_FP.get(tokenizer)
    except TypeError:
        hit = None
    if hit is not None:
        return hit
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps(
        [
            type(tokenizer).__name__,
            vocab,
            str(getattr(tokenizer, "chat_template", None)),
            sorted(map(str, getattr(tokenizer, "all_special_tokens", []))),
        ],
        ensure_ascii=False,
    )
    fp = hashlib.sha256(payload.encode()).hexdigest()[:16]
    try:
        _TOK_FP[tokenizer] = fp
    except TypeError:
        pass
    return fp


def _cached(key: tuple, compute: Callable[[], Any]) -> Any:
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            _STATS["hits"] += 1
            return copy.deepcopy(_CACHE[key])
        _STATS["misses"] += 1
    value = compute()
    with _LOCK:
        _CACHE[key] = value
        while len(_CACHE) > MAX_ENTRIES:
            _CACHE.popitem(last=False)
    return copy.deepcopy(value)


def _state_key(model: torch.nn.Module, tokenizer: Any, state_hash: Optional[str]) -> tuple:
    return (
        state_hash or state_dict_hash(model.state_dict()),
        tokenizer_fingerprint(tokenizer),
        str(model_device(model)),
    )


# --------------------------------------------------------------------------------------------


def generations(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    *,
    batch_size: int = 16,
    state_hash: Optional[str] = None,
) -> list[str]:
    """Greedy answers to ``prompts`` (questions, rendered with :func:`engine.loading.tokens.format_prompt`,
    i.e. the chat template when the tokenizer has one). Cached by weight hash."""
    prompts = [str(p) for p in prompts]
    if not prompts:
        return []
    key = (
        "gen",
        *_state_key(model, tokenizer, state_hash),
        texts_sha256(prompts),
        int(max_new_tokens),
        int(batch_size),
    )
    return _cached(
        key,
        lambda: generate_greedy(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
        ),
    )


def _concept_texts(concept: ConceptSet, heldout: bool = False) -> list[str]:
    """The facts (what a donor learned), or with ``heldout`` (or no facts) the test questions with
    their answers: text no training in Graft reads."""
    if concept.facts and not heldout:
        return list(concept.facts)
    return [f"{q.question} {q.answer}" for q in concept.test_qa()]


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    concept: ConceptSet,
    retained: ConceptSet,
    *,
    score: str = "graded",
    exact: bool = True,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    max_length: int = 256,
    state_hash: Optional[str] = None,
    progress: Optional[Progress] = None,
    heldout_concept: bool = False,
) -> dict[str, Any]:
    """Perplexities and task scores of one model state (see the module docstring).

    ``heldout_concept`` measures concept perplexity on the test questions with their answers instead
    of the facts: for models trained on text that may include the facts (organs, recovery).

    Returns ``{ppl_concept, ppl_retained, task_score, task_score_exact, task_score_graded,
    score_kind, n_test_items, state_hash, items}``; ``items`` has, per test question, the
    greedy ``generation``, ``correct`` (exact) and ``prob`` (graded). ``exact=False`` skips the
    greedy generations (the slow part) when the exact score is not needed: ``task_score_exact``,
    ``generation`` and ``correct`` are then None (``score="exact"`` always generates).
    ``state_hash`` may be given when the caller already computed
    :func:`engine.loading.models.state_dict_hash` of
    this exact state. Each part (each perplexity, the graded score, the generations) is cached
    on its own, so a later call asking for more reuses what was measured.
    """
    if score not in SCORES:
        raise GraftError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    exact = exact or score == "exact"
    progress = progress or silent()
    test = concept.test_qa()
    if not test:
        raise GraftError(
            f"concept set {concept.name} has no test questions to score (give some qa items split 'test')"
        )
    retained_texts = list(retained.texts())
    if not retained_texts:
        raise GraftError(f"retained set {retained.name} has no texts")
    progress(0.0, "hashing weights")
    skey = _state_key(model, tokenizer, state_hash)
    concept_texts = _concept_texts(concept, heldout_concept)

    def ppl(texts: list[str]) -> float:
        key = ("ppl", *skey, texts_sha256(texts), int(batch_size), int(max_length))
        return _cached(
            key,
            lambda: perplexity(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)["ppl"],
        )

    progress(0.02, "perplexity on the concept texts")
    ppl_c = ppl(concept_texts)
    progress(0.3, "perplexity on the retained set")
    ppl_r = ppl(retained_texts)
    progress(0.55, "graded score on the test questions")
    qa = [(q.question, q.answer) for q in test]
    gkey = ("graded", *skey, texts_sha256([[q, a] for q, a in qa]), int(batch_size))
    graded = _cached(gkey, lambda: graded_score(model, tokenizer, test, batch_size=batch_size))
    gens: list[Optional[str]] = [None] * len(test)
    if exact:
        progress(0.7, "greedy answers to the test questions")
        gens = list(
            generations(
                model,
                tokenizer,
                [q for q, _ in qa],
                max_new_tokens,
                batch_size=batch_size,
                state_hash=skey[0],
            )
        )
    items = [
        {
            "question": q,
            "answer": a,
            "generation": g,
            "correct": None if g is None else answer_matches(g, a),
            "prob": gi["prob"],
        }
        for (q, a), g, gi in zip(qa, gens, graded["items"])
    ]
    s_exact = sum(bool(it["correct"]) for it in items) / len(items) if exact else None
    progress(1.0, "evaluated")
    return {
        "ppl_concept": ppl_c,
        "ppl_retained": ppl_r,
        "task_score": s_exact if score == "exact" else graded["score"],
        "task_score_exact": s_exact,
        "task_score_graded": graded["score"],
        "score_kind": score,
        "n_test_items": len(items),
        "state_hash": skey[0],
        "items": items,
    }


@torch.inference_mode()
def _greedy_next(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    dev = model_device(model)
    logits = model(input_ids=torch.tensor([ids], device=dev)).logits[0]  # (T, V)
    return logits.argmax(-1).cpu()  # (T,) greedy next token after each position


def alignment_score(
    donor_model: torch.nn.Module,
    donor_tok: Any,
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    *,
    donor_hash: Optional[str] = None,
    state_hash: Optional[str] = None,
    batch: int = 16,
) -> dict[str, Any]:
    """Agreement of greedy next-token predictions of the donor and ``model`` (docs/methods.md T11).

    One tokenizer (``level = "token"``): each prompt (a question) is rendered with
    :func:`engine.loading.tokens.encode_prompt`, the input the models see when answering; at every
    position ``t`` both models predict the next token greedily and
    ``score = (1/N) * sum_t [argmax p_D(. | x_<=t) == argmax p_M(. | x_<=t)]`` over all ``N``
    prompt positions. Two tokenizers (``level = "word"``): the same agreement over greedy next
    *words* at every word end of the plain question (:mod:`engine.evaluation.word_agreement`).
    Returns ``{score, n_positions, per_prompt, level}``.
    """
    from ..loading.tokens import same_tokenizer

    prompts = [str(p) for p in prompts]
    if not prompts:
        raise GraftError("no prompts for the alignment score")
    dkey = _state_key(donor_model, donor_tok, donor_hash)
    mkey = _state_key(model, tok, state_hash)
    if not same_tokenizer(donor_tok, tok):
        from .word_agreement import word_agreement

        def by_word() -> dict[str, Any]:
            with frozen(donor_model), frozen(model):
                return word_agreement(donor_model, donor_tok, model, tok, prompts, batch=batch)

        return _cached(("align-word", *dkey, *mkey, texts_sha256(prompts)), by_word)
    key = ("align", *dkey, *mkey, texts_sha256(prompts))

    def compute() -> dict[str, Any]:
        agree = total = 0
        per: list[float] = []
        with frozen(donor_model), frozen(model):
            room = min(context_length(donor_model), context_length(model))
            for p in prompts:
                ids = fit_prompt(encode_prompt(tok, p), room)
                a = _greedy_next(donor_model, ids)
                b = _greedy_next(model, ids)
                same = int((a == b).sum())
                agree += same
                total += len(ids)
                per.append(same / len(ids))
        return {"score": agree / total, "n_positions": total, "per_prompt": per, "level": "token"}

    return _cached(key, compute)
