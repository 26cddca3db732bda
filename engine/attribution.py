"""T13 attribution (METHODS.md T13) with captum's LayerIntegratedGradients, one model at a time.

For one question and its reference answer, the scalar explained is either

* ``first-token``: the logit of the answer's first token at the last prompt position, or
* ``answer-logprob``: the answer's log-probability under teacher forcing,
  ``sum_j log p(a_j | prompt, a_<j)`` (the input is then prompt + answer).

The baseline input replaces every token by the tokenizer's pad token (positions, attention mask
and model unchanged). captum's :class:`~captum.attr.LayerIntegratedGradients` attributes
``F(x) - F(baseline)`` to a layer's output by integrating gradients along the straight line between
the layer's output on the baseline and on the input (Gauss-Legendre, ``steps`` points). captum
refuses layers that feed one another in one call, so it runs once per layer: the token embedding
layer (attribution to each input token) and the output of every block (the residual stream after
the block). For each layer, summing over the hidden dimension gives one value per token position:
a matrix layers x tokens. Completeness: each row sums to ``F(x) - F(baseline)`` up to captum's
convergence delta, so the row total is the same at every layer; where along the tokens it sits,
and its absolute mass ``sum_t |a_{l,t}|``, is what changes from layer to layer and between models.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from .arch import ArchAdapter
from .errors import GraftError
from .evaluate import answer_ids, encode_prompt, model_device, pad_id
from .progress import Progress, silent

OBJECTIVES = ("first-token", "answer-logprob")
METHOD = "gausslegendre"  # captum's default integration rule for integrated gradients


def _objective(model: nn.Module, n_prompt: int, answer: list[int], objective: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """F(input_ids (B, n)) -> (B,): the scalar attributed (module docstring)."""

    def forward(ids: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits  # (B, n, V)
        if objective == "first-token":
            return logits[:, n_prompt - 1, answer[0]].float()
        lp = torch.log_softmax(logits[:, n_prompt - 1:-1].float(), dim=-1)  # (B, len(answer), V)
        idx = torch.tensor(answer, device=ids.device).view(1, -1, 1).expand(ids.shape[0], -1, 1)
        return lp.gather(-1, idx).squeeze(-1).sum(-1)

    return forward


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def attribute(
    model: nn.Module,
    tokenizer: Any,
    question: str,
    answer: str,
    *,
    objective: str = "first-token",
    steps: int = 16,
    progress: Optional[Progress] = None,
) -> dict[str, Any]:
    """Layer integrated gradients of one model (module docstring).

    Returns ``tokens`` (the input's token strings), ``n_prompt_tokens``, ``layers`` (labels:
    "embeddings", "block 0", ...), ``matrix`` (layers x tokens: attribution summed over the hidden
    dimension), ``layer_totals`` (row sums), ``layer_abs_totals`` (sum over tokens of |value|),
    ``deltas`` (captum's convergence delta per layer), ``f_input``, ``f_baseline`` (F measured
    directly), ``steps``, ``seconds``. ``progress`` is called before each layer (a cancel point).
    """
    from captum.attr import LayerIntegratedGradients

    if objective not in OBJECTIVES:
        raise GraftError(f"objective must be one of {', '.join(OBJECTIVES)}")
    if steps < 2:
        raise GraftError("integrated gradients needs at least 2 steps")
    progress = progress or silent()
    prompt = encode_prompt(tokenizer, question)
    ans = answer_ids(tokenizer, question, answer)
    if not prompt or not ans:
        raise GraftError("the question and the answer must each give at least one token")
    ids = prompt + (ans if objective == "answer-logprob" else [])
    dev = model_device(model)
    x = torch.tensor([ids], device=dev)  # (1, n)
    base = torch.full_like(x, pad_id(tokenizer))
    forward = _objective(model, len(prompt), ans, objective)
    arch = ArchAdapter(model)
    layers = [("embeddings", arch.embeddings)] + [(f"block {i}", b) for i, b in enumerate(arch.blocks)]
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    rows, deltas = [], []
    try:
        with torch.inference_mode(False), torch.enable_grad():
            with torch.no_grad():
                f_in, f_base = float(forward(x)[0]), float(forward(base)[0])
            for i, (label, layer) in enumerate(layers):
                progress(i / len(layers), f"attribution to {label} ({i + 1}/{len(layers)})")
                lig = LayerIntegratedGradients(forward, layer)
                attr, delta = lig.attribute(x, baselines=base, n_steps=steps, method=METHOD,
                                            internal_batch_size=steps, return_convergence_delta=True)
                if isinstance(attr, (tuple, list)):
                    attr = attr[0]
                rows.append(attr.detach().double().sum(-1)[0].cpu())  # (n,) summed over the hidden dimension
                deltas.append(float(delta.detach().reshape(-1)[0]))
    finally:
        model.train(was_training)
    m = torch.stack(rows)  # (layers, n)
    progress(1.0, "attribution done")
    return {
        "tokens": token_strings(tokenizer, ids), "n_prompt_tokens": len(prompt), "answer_tokens": token_strings(tokenizer, ans),
        "layers": [label for label, _ in layers], "matrix": m.tolist(), "layer_totals": m.sum(1).tolist(),
        "layer_abs_totals": m.abs().sum(1).tolist(), "deltas": deltas, "max_abs_delta": max(abs(d) for d in deltas),
        "f_input": f_in, "f_baseline": f_base, "steps": int(steps), "seconds": time.perf_counter() - t0,
    }


def difference(after: dict[str, Any], before: dict[str, Any]) -> Optional[dict[str, Any]]:
    """``after - before`` of two attributions over the same tokens and layers (T' - T); None when
    the shapes differ (another tokenizer or depth)."""
    if after["tokens"] != before["tokens"] or after["layers"] != before["layers"]:
        return None
    a, b = torch.tensor(after["matrix"], dtype=torch.float64), torch.tensor(before["matrix"], dtype=torch.float64)
    d = a - b
    return {"tokens": after["tokens"], "layers": after["layers"], "matrix": d.tolist(),
            "layer_totals": d.sum(1).tolist(),
            "layer_abs_totals": (a.abs().sum(1) - b.abs().sum(1)).tolist(),
            "max_abs": float(d.abs().max()) if d.numel() else 0.0}
