"""One optimiser configuration for everything Graft trains in organ work (docs/methods.md, operation
2): standalone organ training, recovery after insertion, trained bridges, and the LoRA baseline they
are compared with. The default is the NOT paper's: AdamW, lr 1e-4, weight decay 0.01, linear warm-up
then cosine decay, a budget in epochs.

An epoch is one pass over the training texts in a seeded random order, ``ceil(n / batch_size)``
batches; the last batch of an epoch may be smaller. ``steps`` > 0 replaces the epoch budget by a
step budget (the batches still run through seeded epochs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import torch

from .errors import GraftError


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 5.0
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of the steps spent warming up (linearly from lr / W to lr)
    batch_size: int = 8
    max_length: int = 128
    steps: int = 0  # > 0: this many steps instead of the epochs

    def check(self) -> None:
        if self.steps <= 0 and not self.epochs > 0:
            raise GraftError("training needs epochs > 0 (or steps > 0)")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.warmup < 1:
            raise GraftError("training needs lr > 0, weight decay >= 0 and a warm-up share in [0, 1)")
        if self.batch_size < 1 or self.max_length < 2:
            raise GraftError("training needs batch size >= 1 and max length >= 2")

    def per_epoch(self, n_texts: int) -> int:
        return max(1, math.ceil(n_texts / self.batch_size))

    def total_steps(self, n_texts: int) -> int:
        if self.steps > 0:
            return int(self.steps)
        return max(1, math.ceil(self.epochs * self.per_epoch(n_texts)))

    def warmup_steps(self, total: int) -> int:
        return min(total - 1, math.ceil(self.warmup * total)) if self.warmup > 0 else 0

    def lr_at(self, step: int, total: int) -> float:
        """Linear warm-up over the first ``warmup_steps``, then cosine decay to 0 at ``total``."""
        w = self.warmup_steps(total)
        if step < w:
            return self.lr * (step + 1) / w
        t = (step - w) / max(total - w, 1)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    def optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(params), lr=self.lr, weight_decay=self.weight_decay)

    def batches(self, n_texts: int, seed: int) -> Iterator[list[int]]:
        """Indices of each step's batch: seeded epochs (a new permutation per epoch), in order."""
        total = self.total_steps(n_texts)
        per = self.per_epoch(n_texts)
        gen = torch.Generator().manual_seed(int(seed))
        order: list[int] = []
        for step in range(total):
            k = step % per
            if k == 0:
                order = torch.randperm(n_texts, generator=gen).tolist()
            yield order[k * self.batch_size : (k + 1) * self.batch_size]

    def describe(self, n_texts: int) -> dict[str, Any]:
        total = self.total_steps(n_texts)
        return {
            **asdict(self),
            "optimizer": "AdamW",
            "schedule": f"linear warm-up {self.warmup_steps(total)} steps, cosine to 0",
            "total_steps": total,
            "texts": n_texts,
        }


PAPER = TrainConfig()  # the NOT paper's optimiser, 5 epochs


def from_params(params: Any, epochs: float, steps: int = 0, max_length: int = 128) -> TrainConfig:
    """The configuration of a tool's :class:`engine.core.params.OptimParams` for ``epochs``."""
    cfg = TrainConfig(
        epochs=float(epochs),
        lr=float(params.lr),
        weight_decay=float(params.weight_decay),
        warmup=float(params.warmup),
        batch_size=int(params.train_batch),
        max_length=int(max_length),
        steps=int(steps),
    )
    cfg.check()
    return cfg
