"""T13 attribution (docs/methods.md T13) with captum's LayerIntegratedGradients, one model at a time.

For one question and its reference answer, the scalar explained is either

* ``first-token``: the logit of the answer's first token at the last prompt position, or
* ``answer-logprob``: the answer's log-probability under teacher forcing,
  ``sum_j log p(a_j | prompt, a_<j)`` (the input is then prompt + answer).

captum's :class:`~captum.attr.LayerIntegratedGradients` attributes ``F(x) - F(baseline)`` to a
layer's output by integrating gradients along the straight line between the layer's output on the
baseline input and on the real input (Gauss-Legendre, ``steps`` points). captum refuses layers that
feed one another in one call, so it runs once per layer: the token embedding layer (attribution to
each input token) and the output of every block (the residual stream after the block). Summing over
the hidden dimension gives one value per token position: a matrix layers x tokens. Completeness:
each row sums to ``F(x) - F(baseline)`` up to captum's convergence delta.

The baseline (``content``, the default) is the same prompt with only the question's tokens (and,
for ``answer-logprob``, the answer's) replaced by a filler token; the chat template, its special
tokens and the first position stay. An all-filler baseline (``all``) breaks completeness in the
early layers, for two measured reasons: where the filler's embedding row is zero (a pad token
with ``padding_idx``, as in the tiny Llama) every layer's baseline activation is exactly zero and
the path starts at the singular point of RMSNorm (F jumps within alpha < 1e-4), so no number of
steps converges; and a sequence of one repeated token gives every position the same activations
(SmolLM2: the massive attention-sink activations of position 0 at every position), so F along the
path oscillates (total variation 7x |F(x) - F(b)|) and 16-64 points miss it. The filler is the pad
token unless its embedding row is (near) zero, then the first candidate (eos, unk, bos, "." , " ")
whose row is not. Layers whose ``|delta| / |F(x) - F(b)|`` still exceeds ``tolerance`` after
``max_steps`` are listed in ``unreliable`` (the integrand needs more points there).
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..core.errors import GraftError
from ..core.progress import Progress, silent
from ..loading.arch import ArchAdapter
from ..loading.tokens import (
    answer_ids,
    context_length,
    encode_prompt,
    format_prompt,
    has_chat_template,
    model_device,
    pad_id,
)

OBJECTIVES = ("first-token", "answer-logprob")
BASELINES = ("content", "all")
METHOD = "gausslegendre"  # captum's default integration rule for integrated gradients
TOLERANCE = 0.05  # a layer is reliable when |delta| <= TOLERANCE * |F(x) - F(baseline)|


def _objective(
    model: nn.Module, n_prompt: int, answer: list[int], objective: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """F(input_ids (B, n)) -> (B,): the scalar attributed (module docstring). Only the logits F
    reads are computed (``logits_to_keep``) where the model supports it."""
    keep = 1 if objective == "first-token" else len(answer) + 1
    kw = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def forward(ids: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kw).logits
        logits = logits[:, -keep:]  # (B, keep, V): positions n-keep .. n-1
        if objective == "first-token":
            return logits[:, -1, answer[0]].float()
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, len(answer), V)
        idx = torch.tensor(answer, device=ids.device).view(1, -1, 1).expand(ids.shape[0], -1, 1)
        return lp.gather(-1, idx).squeeze(-1).sum(-1)

    return forward


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def _question_positions(tokenizer: Any, question: str, prompt: list[int]) -> list[int]:
    """Positions of the prompt's tokens that overlap the question's characters (offsets of a fast
    tokenizer); every non-special token when offsets are unavailable."""
    text = format_prompt(tokenizer, question)
    try:
        enc = tokenizer(
            text, add_special_tokens=not has_chat_template(tokenizer), return_offsets_mapping=True
        )
        offsets = enc["offset_mapping"]
        if list(enc["input_ids"]) != list(prompt) or question not in text:
            raise ValueError
    except (ValueError, NotImplementedError, TypeError, KeyError):
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        return [i for i, t in enumerate(prompt) if t not in special]
    s0 = text.rindex(question)
    s1 = s0 + len(question)
    return [i for i, (a, b) in enumerate(offsets) if a < s1 and b > s0]


def filler_token(model: nn.Module, tokenizer: Any) -> int:
    """The token that replaces the attributed tokens in the baseline: the pad token unless its
    embedding row is (near) zero (``padding_idx``: a zero baseline sits on RMSNorm's singular
    point), then the first candidate whose row is not."""
    emb = model.get_input_embeddings().weight
    norms = emb.detach().float().norm(dim=-1)
    floor = 1e-3 * float(norms.median())
    cands = [pad_id(tokenizer)] + [
        getattr(tokenizer, a, None) for a in ("eos_token_id", "unk_token_id", "bos_token_id")
    ]
    for text in (".", " "):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cands += ids[:1]
    for c in cands:
        if c is not None and 0 <= int(c) < norms.numel() and float(norms[int(c)]) > floor:
            return int(c)
    return int(norms.argmax())


def baseline_ids(
    model: nn.Module,
    tokenizer: Any,
    question: str,
    prompt: list[int],
    answer: list[int],
    objective: str,
    baseline: str,
) -> tuple[list[int], list[int], int]:
    """(input ids, baseline ids, filler): see the module docstring."""
    ids = prompt + (answer if objective == "answer-logprob" else [])
    fill = filler_token(model, tokenizer)
    if baseline == "all":
        return ids, [fill] * len(ids), fill
    swap = set(_question_positions(tokenizer, question, prompt)) | set(range(len(prompt), len(ids)))
    return ids, [fill if i in swap else t for i, t in enumerate(ids)], fill


def _layer_ig(
    forward: Callable, layer: nn.Module, x: torch.Tensor, base: torch.Tensor, steps: int, batch: int
) -> tuple[torch.Tensor, float]:
    from captum.attr import LayerIntegratedGradients

    lig = LayerIntegratedGradients(forward, layer)
    attr, delta = lig.attribute(
        x,
        baselines=base,
        n_steps=steps,
        method=METHOD,
        internal_batch_size=min(steps, batch),
        return_convergence_delta=True,
    )
    if isinstance(attr, (tuple, list)):
        attr = attr[0]
    return attr.detach().double().sum(-1)[0].cpu(), float(delta.detach().reshape(-1)[0])


def attribute(
    model: nn.Module,
    tokenizer: Any,
    question: str,
    answer: str,
    *,
    objective: str = "first-token",
    steps: int = 16,
    max_steps: Optional[int] = None,
    baseline: str = "content",
    tolerance: float = TOLERANCE,
    batch: int = 32,
    progress: Optional[Progress] = None,
) -> dict[str, Any]:
    """Layer integrated gradients of one model (module docstring).

    Each layer starts at ``steps`` points; while ``|delta| > tolerance * |F(x) - F(b)|`` and the
    points are below ``max_steps`` (default ``steps``: no doubling) the layer is run again with
    twice the points. Returns ``tokens``, ``n_prompt_tokens``, ``layers`` ("embeddings",
    "block 0", ...), ``matrix`` (layers x tokens), ``layer_totals`` (row sums), ``layer_abs_totals``,
    ``deltas`` (captum's convergence delta per layer), ``rel_deltas`` (``|delta| / |F(x) - F(b)|``),
    ``layer_steps`` (points used per layer), ``unreliable`` (labels of layers over ``tolerance``),
    ``f_input``, ``f_baseline`` (F measured directly), ``input_ids``, ``baseline_ids``,
    ``baseline_tokens``, ``filler``, ``steps``, ``seconds``.
    ``progress`` is called before each layer (a cancel point).
    """
    if objective not in OBJECTIVES:
        raise GraftError(f"objective must be one of {', '.join(OBJECTIVES)}")
    if baseline not in BASELINES:
        raise GraftError(f"baseline must be one of {', '.join(BASELINES)}")
    max_steps = steps if max_steps is None else max_steps
    if steps < 2 or max_steps < steps:
        raise GraftError("integrated gradients needs at least 2 steps, and max_steps >= steps")
    progress = progress or silent()
    prompt = encode_prompt(tokenizer, question)
    ans = answer_ids(tokenizer, question, answer)
    if not prompt or not ans:
        raise GraftError("the question and the answer must each give at least one token")
    ids, base_ids, fill = baseline_ids(model, tokenizer, question, prompt, ans, objective, baseline)
    if len(ids) > context_length(model):
        raise GraftError(
            f"the question{' and answer' if objective == 'answer-logprob' else ''} "
            f"{'take' if objective == 'answer-logprob' else 'takes'} {len(ids)} tokens, more "
            f"than the model's context of {context_length(model)} positions: use a shorter question"
        )
    dev = model_device(model)
    x, base = torch.tensor([ids], device=dev), torch.tensor([base_ids], device=dev)  # (1, n)
    forward = _objective(model, len(prompt), ans, objective)
    arch = ArchAdapter(model)
    layers = [("embeddings", arch.embeddings)] + [(f"block {i}", b) for i, b in enumerate(arch.blocks)]
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    rows, deltas, used = [], [], []
    try:
        with torch.inference_mode(False), torch.enable_grad():
            with torch.no_grad():
                f_in, f_base = float(forward(x)[0]), float(forward(base)[0])
            scale = abs(f_in - f_base)
            for i, (label, layer) in enumerate(layers):
                n = steps
                while True:
                    progress(i / len(layers), f"attribution to {label} ({i + 1}/{len(layers)}, {n} steps)")
                    row, delta = _layer_ig(forward, layer, x, base, n, batch)
                    if abs(delta) <= tolerance * scale or 2 * n > max_steps:
                        break
                    n *= 2
                rows.append(row)
                deltas.append(delta)
                used.append(n)
    finally:
        model.train(was_training)
    m = torch.stack(rows)  # (layers, n)
    rel = [abs(d) / scale if scale > 0 else (0.0 if d == 0 else None) for d in deltas]
    labels = [label for label, _ in layers]
    progress(1.0, "attribution done")
    return {
        "tokens": token_strings(tokenizer, ids),
        "n_prompt_tokens": len(prompt),
        "answer_tokens": token_strings(tokenizer, ans),
        "input_ids": ids,
        "baseline_ids": base_ids,
        "baseline_tokens": token_strings(tokenizer, base_ids),
        "filler": token_strings(tokenizer, [fill])[0],
        "layers": labels,
        "matrix": m.tolist(),
        "layer_totals": m.sum(1).tolist(),
        "layer_abs_totals": m.abs().sum(1).tolist(),
        "deltas": deltas,
        "max_abs_delta": max(abs(d) for d in deltas),
        "rel_deltas": rel,
        "max_rel_delta": None if None in rel else max(rel),
        "layer_steps": used,
        "unreliable": [lab for lab, r in zip(labels, rel) if r is None or r > tolerance],
        "f_input": f_in,
        "f_baseline": f_base,
        "steps": int(steps),
        "seconds": time.perf_counter() - t0,
    }


def difference(after: dict[str, Any], before: dict[str, Any]) -> Optional[dict[str, Any]]:
    """``after - before`` of two attributions over the same tokens and layers (T' - T); None when
    the shapes differ (another tokenizer or depth)."""
    if after["tokens"] != before["tokens"] or after["layers"] != before["layers"]:
        return None
    a, b = (
        torch.tensor(after["matrix"], dtype=torch.float64),
        torch.tensor(before["matrix"], dtype=torch.float64),
    )
    d = a - b
    return {
        "tokens": after["tokens"],
        "layers": after["layers"],
        "matrix": d.tolist(),
        "layer_totals": d.sum(1).tolist(),
        "layer_abs_totals": (a.abs().sum(1) - b.abs().sum(1)).tolist(),
        "max_abs": float(d.abs().max()) if d.numel() else 0.0,
    }
