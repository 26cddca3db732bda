"""Training for organs (docs/methods.md operation 2): the causal LM loop shared by standalone organ
training, recovery fine-tuning and trained bridges, and the standalone organ model.

Standalone training, as in NOT: frozen embeddings -> organ -> frozen final norm and head. The
model is a working copy of the organ's source model (sharing every tensor, so nothing is copied
but the organ) whose block list is the organ alone; the model's own forward supplies position
embeddings and masks. Only the organ's tensors get gradients. Deterministic for a given seed:
batches are drawn from a seeded generator and dropout is off (the model stays in eval mode).
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import GraftError
from ..core.progress import Progress, silent
from ..core.train_config import TrainConfig
from ..loading.arch import ArchAdapter
from ..loading.models import LoadedModel
from ..loading.tokens import encode_text, model_device, pad_id
from .organ import Organ, blocks_to_tensors, build_blocks, tensors_sha256
from .reversible import working_copy


def lm_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def _batch(
    encoded: list[list[int]], idx: list[int], fill: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(encoded[i]) for i in idx)
    ids = torch.full((len(idx), width), fill, dtype=torch.long, device=dev)
    mask = torch.zeros_like(ids)
    for r, i in enumerate(idx):
        ids[r, : len(encoded[i])] = torch.tensor(encoded[i], device=dev)
        mask[r, : len(encoded[i])] = 1
    return ids, mask


def train_lm(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    params: Iterable[nn.Parameter],
    config: TrainConfig,
    *,
    seed: int,
    progress: Optional[Progress] = None,
    what: str = "training",
) -> list[float]:
    """Causal LM training of ``params`` on ``texts`` with ``config`` (AdamW, warm-up then cosine, a
    budget in epochs of seeded permutations); returns the loss of every step. Dropout stays off
    (eval mode) so a seed fixes the run."""
    progress = progress or silent()
    config.check()
    params = list(params)
    encoded = [e for e in (encode_text(tokenizer, t, config.max_length) for t in texts) if len(e) >= 2]
    if not encoded:
        raise GraftError("no training text has two tokens or more")
    if not params:
        return []
    total = config.total_steps(len(encoded))
    dev = model_device(model)
    fill = pad_id(tokenizer)
    losses: list[float] = []
    with torch.inference_mode(False), torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        opt = config.optimizer(params)
        try:
            for step, idx in enumerate(config.batches(len(encoded), seed)):
                progress(step / total, f"{what}: step {step + 1}/{total}")
                for group in opt.param_groups:
                    group["lr"] = config.lr_at(step, total)
                ids, mask = _batch(encoded, idx, fill, dev)
                loss = lm_loss(model, ids, mask)
                if not torch.isfinite(loss):
                    raise GraftError(
                        f"{what} diverged at step {step + 1} (loss is not finite): lower the learning rate"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
    progress(1.0, f"{what}: done")
    return losses


@torch.inference_mode()
def mean_loss(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 128, batch_size: int = 8
) -> float:
    """Token-weighted mean causal LM loss over ``texts``."""
    encoded = [e for e in (encode_text(tokenizer, t, max_length) for t in texts) if len(e) >= 2]
    dev, fill = model_device(model), pad_id(tokenizer)
    total, count = 0.0, 0
    for b0 in range(0, len(encoded), batch_size):
        idx = list(range(b0, min(b0 + batch_size, len(encoded))))
        ids, mask = _batch(encoded, idx, fill, dev)
        n = int(mask[:, 1:].sum())
        total += float(lm_loss(model, ids, mask)) * n
        count += n
    return total / max(count, 1)


def standalone_model(source: LoadedModel, organ: Organ) -> tuple[nn.Module, list[nn.Module]]:
    """Embeddings -> organ -> final norm + head: a working copy of ``source`` whose blocks are the organ."""
    working = working_copy(source, [])
    arch = ArchAdapter(working)
    blocks = build_blocks(organ, arch.blocks[0], 0, source.device, source.dtype)
    parent_path, _, attr = arch.blocks_path.rpartition(".")
    parent = working.get_submodule(parent_path) if parent_path else working
    setattr(parent, attr, nn.ModuleList(blocks))
    cfg = arch.text_config
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, name):
            setattr(cfg, name, organ.size)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[: organ.size]
    return working, blocks


def train_organ(
    source: LoadedModel,
    organ: Organ,
    texts: Sequence[str],
    config: TrainConfig,
    *,
    seed: int,
    data: Optional[dict[str, Any]] = None,
    progress: Optional[Progress] = None,
) -> tuple[Organ, list[float], dict[str, float]]:
    """Train ``organ`` standalone on ``texts``; returns the trained organ (a new one), the loss
    curve and metrics (standalone perplexity on the texts before and after, and ``train_seconds``:
    the optimiser steps alone)."""
    progress = progress or silent()
    model, blocks = standalone_model(source, organ)
    progress(0.02, "standalone perplexity before training")
    before = mean_loss(model, source.tokenizer, texts, config.max_length)
    params = [p for b in blocks for p in b.parameters()]
    t0 = time.perf_counter()
    losses = train_lm(
        model,
        source.tokenizer,
        texts,
        params,
        config,
        seed=seed,
        progress=progress.sub(0.05, 0.95),
        what="standalone organ training",
    )
    train_seconds = time.perf_counter() - t0  # the optimiser steps alone, no evaluation
    after = mean_loss(model, source.tokenizer, texts, config.max_length)
    tensors = blocks_to_tensors(blocks)
    for k, v in organ.tensors.items():  # keep the checkpoint's dtype
        tensors[k] = tensors[k].to(v.dtype)
    metrics = {
        "standalone_ppl_before": _ppl(before),
        "standalone_ppl_after": _ppl(after),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }
    card = dict(
        organ.card,
        input_layer=0,
        metrics=dict(metrics),
        tensors_sha256=tensors_sha256(tensors),
        training={
            "kind": "standalone",
            **config.describe(len(texts)),
            "seed": seed,
            "data": data or {},
            "from_sha256": organ.sha256(),
            "from_input_layer": organ.input_layer,
            "previous": organ.card.get("training"),
            "train_steps": len(losses),
        },
    )
    progress(1.0, "trained")
    # the optimiser steps alone, without the evaluations: a timing, so it stays out of the card
    metrics["train_seconds"] = round(train_seconds, 3)
    return Organ(card, tensors), losses, metrics


def _ppl(loss: float) -> Optional[float]:
    return math.exp(loss) if loss < 700 else None
