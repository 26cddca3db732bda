"""Function-preservation check of a rotated twin (:mod:`engine.surgery.twin`): the twin must give its base
model's logits on the check texts, up to the rounding of its dtype (:data:`TOLERANCES`).

Each text is run alone (unpadded, truncated to ``max_tokens`` and both models' context); logits
are compared in float64. The default check texts are the first :data:`DEFAULT_N_TEXTS` texts of
the bundled retained set.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from ..core.errors import GraftError
from ..core.progress import Progress, silent

DEFAULT_N_TEXTS = 6
DEFAULT_MAX_TOKENS = 128

# Tolerance on max |logit(twin) - logit(base)| / max |logit(base)| over the check texts, by the
# dtype the twin is stored in. The twin is exact in real arithmetic; what remains is rounding:
# float32 weights are rounded once after the float64 products (~6e-8 relative each) and every
# matmul then rounds in a different basis, which grows through depth. Measured (float32, seed 0,
# the 6 default texts): 4.5e-7 on the 4-layer tiny Llama, 2.9e-6 on SmolLM2-135M-Instruct
# (30 layers, max |logit| 32.7, max |diff| 9.3e-5); the bound leaves a 35x margin while still
# catching any real error (a missing fold or a wrong sign gives O(1)). float64 gets the same
# bound: transformers' RMSNorm normalises in float32 whatever the dtype (measured 1.3e-7 on the
# tiny Llama). 16-bit formats round every weight at ~5e-4 (fp16) / ~4e-3 (bf16) and get looser
# bounds (measured on the tiny Llama: fp16 1.3e-3, bf16 9.3e-3 with 98% top-1 agreement).
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-4,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}


def _max_positions(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if n else DEFAULT_MAX_TOKENS


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    out = model(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev), use_cache=False)
    return out.logits[0].to(torch.float64).cpu()


def _encode(tokenizer: Any, texts: Iterable[str], max_tokens: int) -> list[torch.Tensor]:
    out = []
    for t in texts:
        ids = tokenizer(t, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"]
        if ids.shape[1]:
            out.append(ids)
    if not out:
        raise GraftError("rotated twin: no non-empty texts to compare the logits on")
    return out


def _compare(
    a: nn.Module,
    b: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_tokens: Optional[int],
    progress: Optional[Progress] = None,
) -> dict[str, Any]:
    progress = progress or silent()
    limit = min(_max_positions(a), _max_positions(b), max_tokens or DEFAULT_MAX_TOKENS)
    batches = _encode(tokenizer, texts, limit)
    diff = scale = 0.0
    agree = tokens = 0
    for k, ids in enumerate(batches):
        la, lb = _logits(a, ids), _logits(b, ids)
        diff = max(diff, float((la - lb).abs().max()))
        scale = max(scale, float(la.abs().max()))
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
        tokens += int(ids.shape[1])
        progress((k + 1) / len(batches), f"comparing logits {k + 1}/{len(batches)}")
    return {
        "max_abs_diff": diff,
        "logit_scale": scale,
        "top1_agreement": agree / tokens,
        "n_texts": len(batches),
        "n_tokens": tokens,
    }


def max_logit_diff(
    a: nn.Module, b: nn.Module, tokenizer: Any, texts: Sequence[str], max_tokens: int = DEFAULT_MAX_TOKENS
) -> float:
    """``max |logits_a - logits_b|`` over every position of every text (each text alone, unpadded,
    truncated to ``max_tokens`` and the models' context), computed in float64 from each model's
    own logits."""
    return float(_compare(a, b, tokenizer, texts, max_tokens)["max_abs_diff"])


def tolerance_for(dtype: torch.dtype) -> float:
    """The relative logit tolerance for a twin stored in ``dtype`` (see ``TOLERANCES``)."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def twin_report(
    base: nn.Module,
    twin: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    tolerance: Optional[float] = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: Optional[Progress] = None,
) -> dict[str, Any]:
    """Function-preservation check of ``twin`` against ``base`` on ``texts``.

    Returns ``max_abs_diff`` (max |logit difference|), ``logit_scale`` (max |logit| of the base),
    ``rel_diff`` = their ratio, ``tolerance`` (relative; default by the twin's dtype,
    :data:`TOLERANCES`), ``ok`` (``rel_diff <= tolerance``), ``top1_agreement`` (share of positions
    whose argmax token agrees), ``n_texts``, ``n_tokens`` and ``dtype``."""
    dtype = next(twin.parameters()).dtype
    tol = float(tolerance) if tolerance is not None else tolerance_for(dtype)
    r = _compare(base, twin, tokenizer, texts, max_tokens, progress)
    r["rel_diff"] = r["max_abs_diff"] / max(r["logit_scale"], 1e-12)
    r["tolerance"] = tol
    r["ok"] = bool(math.isfinite(r["rel_diff"]) and r["rel_diff"] <= tol)
    r["dtype"] = str(dtype).replace("torch.", "")
    return r


def default_check_texts(n: int = DEFAULT_N_TEXTS) -> list[str]:
    """The first ``n`` texts of the bundled retained set (data/retained.jsonl)."""
    from ..core.data import builtin_retained_path, load_concept_set

    return list(load_concept_set(builtin_retained_path()).texts()[:n])
