"""T2 and T3 on a streamed pair without every layer's rows in memory (docs/methods.md, "Statistics
that scale"; ``--stats streamed``).

The rows route captures ``(L+1, n, d)`` float32 rows per model and computes T2 and T3 from them:
at d = 4,096 and the 5,500 tokens a determined T3 needs, that is 2.9 GiB per model before any
copy. Here the rows of a layer exist only while its block is read:

* **T2** (:func:`lean_stats`): each model is walked once (``LayerWalker``, engine/measure/stream_capture.py);
  every layer's aligned rows give their norms (for the massive-activation rule) and one Gram matrix
  per minibatch of ``MINIBATCH_ROWS`` rows (:mod:`engine.measure.cka`), and are dropped. CKA is then
  the minibatch estimator of Nguyen, Raghu and Kornblith (2021): unbiased HSIC summed over the
  minibatches (:func:`~engine.measure.cka.minibatch_cka`). Memory n x b per layer instead of n x d.
* **T3** (:func:`lockstep_pairs`): both models are walked in step, and each matched pair (i, j) is
  fitted from the rows of donor layer i and target layer j as soon as both exist (the same
  :func:`~engine.measure.procrustes_pair.fit_pair` as the rows route, so the same numbers), then
  those rows are dropped. Memory: two blocks, two workloads' hidden states, one pair of rows.

Rows are aligned (token, word or text level) and massive activations dropped by the same rules as
the rows route (:func:`~engine.measure.align.alignment_of`, :func:`~engine.measure.align.outlier_keep`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..core.errors import GraftError
from ..core.progress import Progress
from ..evaluation.beforeafter import locked
from ..loading.models import LoadedModel
from ..measure.align import RowAlignment, alignment_of, outlier_keep
from ..measure.cka import MINIBATCH_ROWS, minibatch_cka, minibatch_grams, minibatch_parts
from ..measure.stream_capture import LayerWalker


@dataclass
class LeanStats:
    """What T2 keeps of a streamed pair: the row alignment (outliers applied), the minibatches,
    and every layer's Gram matrix per minibatch, ``h_{-1}`` first."""

    ra: RowAlignment
    parts: list[torch.Tensor]
    grams_x: list[torch.Tensor]  # per minibatch: (Lx+1, m, m)
    grams_y: list[torch.Tensor]
    n_tokens_donor: int
    n_tokens_target: int
    dx: int
    dy: int

    def cka(self, include_embeddings: bool, progress: Optional[Progress] = None) -> torch.Tensor:
        s = 0 if include_embeddings else 1
        keep = [self.ra.keep.index_select(0, p) for p in self.parts]
        return minibatch_cka([g[s:] for g in self.grams_x], [g[s:] for g in self.grams_y], keep, progress)

    def summary(self) -> dict[str, Any]:
        return {**self.ra.summary(), "cka_minibatches": len(self.parts), "cka_minibatch_rows": MINIBATCH_ROWS}


def _finite(model: LoadedModel, rows: torch.Tensor, layer: int) -> None:
    if rows.numel() and not bool(torch.isfinite(rows).all()):
        where = "the embeddings" if layer < 0 else f"block {layer}"
        raise GraftError(f"{model.label}: the rows after {where} are not finite (NaN or inf)")


def _walkers(
    donor: LoadedModel, target: LoadedModel, texts: Sequence[str], batch_size: int, progress: Progress
):
    wd = LayerWalker(donor, texts, batch_size=batch_size, progress=progress.sub(0, 0.02))
    wt = (
        wd
        if target is donor
        else LayerWalker(target, texts, batch_size=batch_size, progress=progress.sub(0, 0.02))
    )
    return wd, wt


@torch.inference_mode()
def lean_stats(
    donor: LoadedModel,
    target: LoadedModel,
    texts: Sequence[str],
    *,
    batch_size: int,
    outlier_factor: float,
    progress: Progress,
) -> LeanStats:
    """One walk of each model: row norms and minibatch Gram matrices of every layer."""
    with locked(donor, target):
        wd, wt = _walkers(donor, target, texts, batch_size, progress)
        ra = alignment_of(wd.skeleton(), wt.skeleton())
        n = ra.n
        parts = minibatch_parts(n)

        def walk(w: LayerWalker, side: Callable[[torch.Tensor], torch.Tensor], p: Progress):
            w.progress = p
            grams = [torch.empty((w.L + 1, len(q), len(q)), dtype=torch.float32) for q in parts]
            norms = torch.empty((w.L + 1, n), dtype=torch.float32)
            for l in range(-1, w.L):
                rows = side(w.embeddings() if l < 0 else w.step())
                _finite(w.model, rows, l)
                norms[l + 1] = rows.norm(dim=-1)
                minibatch_grams(rows, parts, grams, l + 1)
            return grams, norms

        gx, nx = walk(wd, ra.base, progress.sub(0.02, 0.5 if wt is not wd else 0.98))
        if wt is wd:  # a model against itself: one walk serves both sides
            gy, ny = gx, nx
        else:
            gy, ny = walk(wt, ra.target, progress.sub(0.5, 0.98))
    ra = outlier_keep(ra, nx, ny, outlier_factor)
    return LeanStats(ra, parts, gx, gy, wd.n, wt.n, donor.arch.hidden_size, target.arch.hidden_size)


class _Cache:
    """The rows of one walker's layers that pairs still to come will read."""

    def __init__(self, walker: LayerWalker) -> None:
        self.walker, self.rows = walker, {}

    def get(self, layer: int, wanted: set[int]) -> torch.Tensor:
        for l in [l for l in self.rows if l not in wanted]:
            del self.rows[l]
        while self.walker.layer < layer:
            rows = self.walker.step()
            if self.walker.layer in wanted:
                self.rows[self.walker.layer] = rows
        return self.rows[layer]


@torch.inference_mode()
def lockstep_pairs(
    donor: LoadedModel,
    target: LoadedModel,
    texts: Sequence[str],
    ra: RowAlignment,
    pairs: Sequence[tuple[int, int]],
    fit: Callable[[int, int, torch.Tensor, torch.Tensor], Any],
    *,
    batch_size: int,
    progress: Progress,
) -> list[Any]:
    """``fit(i, j, X_i, Y_j)`` for every (block i, block j) pair, in order, with both models walked
    in step: a pair is fitted once both layers' rows exist, from the aligned rows (outliers dropped
    as ``ra.keep`` says). Pairs must be non-decreasing in both layers (a monotone matching, or equal
    depth), so each model is read once."""
    pairs = [(int(i), int(j)) for i, j in pairs]
    if any(b[0] < a[0] or b[1] < a[1] for a, b in zip(pairs, pairs[1:])):
        raise GraftError("internal: lockstep pairs must be non-decreasing in both layers")
    out: list[Any] = []
    with locked(donor, target):
        wd, wt = _walkers(donor, target, texts, batch_size, progress)
        if (wd.n, wt.n) != (ra.n_base, ra.n_target):
            raise GraftError("internal: the walkers' rows differ from the row alignment's")
        wd.progress = progress.sub(0.02, 0.98)
        wt.progress = progress.sub(0.02, 0.98)
        cd = _Cache(wd)
        ct = cd if wt is wd else _Cache(wt)
        for k, (i, j) in enumerate(pairs):
            rest = pairs[k:]
            want_d = {a for a, _ in rest} | ({b for _, b in rest} if ct is cd else set())
            want_t = want_d if ct is cd else {b for _, b in rest}
            X = ra.base(cd.get(i, want_d))
            Y = ra.target(ct.get(j, want_t))
            _finite(donor, X, i)
            _finite(target, Y, j)
            progress.check()
            out.append(fit(i, j, X, Y))
            progress(0.02 + 0.96 * (k + 1) / len(pairs), f"Procrustes layer {i} -> {j}")
    return out
