"""Row alignment of two captures (docs/methods.md, "Token alignment across models").

* Same tokenisation of every text -> token level: row i of both captures is the same token.
* Different tokenizers with character offsets -> word level: each model's tokens are
  mean-pooled per whitespace-delimited word (per character in scripts written without spaces:
  Chinese, Japanese, Thai...), and words seen by both models are kept.
* No offsets -> text level: mean-pool each text.

:func:`row_alignment` generalises this from the residual stream to any captured rows (a module's
inputs or outputs, for the rank-k conjugation): it records how rows pair up once, and maps each
capture's rows onto the aligned ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..core.errors import GraftError
from .capture import Capture

# Scripts written without spaces between words (CJK ideographs, kana, Thai, Lao, Khmer, Myanmar,
# Tibetan, half-width katakana): there each character is a word, else a sentence of Chinese would be
# one row. Elsewhere a word is a run of non-space characters.
_UNSPACED = (
    "\u2e80-\u9fff\uf900-\ufaff\U00020000-\U0003ffff"
    "\u0e00-\u0eff\u1780-\u17ff\u1000-\u109f\u0f00-\u0fff\uff66-\uff9f"
)
UNSPACED_CHAR = re.compile(f"[{_UNSPACED}]")
_WORD = re.compile(f"[{_UNSPACED}]|[^\\s{_UNSPACED}]+")


def word_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every word of ``text``: a run of non-space characters, or one character of a
    script written without spaces."""
    return [(m.start(), m.end()) for m in _WORD.finditer(text)]


@dataclass
class Aligned:
    """Row-aligned residual streams of donor (X) and target (Y).

    X: (L_D+1, n, d_D); Y: (L_T+1, n, d_T); index 0 is h_{-1}. group: (n,) text of each row.
    """

    X: torch.Tensor
    Y: torch.Tensor
    group: torch.Tensor
    mode: str  # "token" | "word" | "text"
    n_outliers: int = 0  # rows dropped as massive activations (see drop_outliers)

    @property
    def n(self) -> int:
        return int(self.X.shape[1])

    def summary(self) -> dict:
        return {
            "alignment": self.mode,
            "n_rows": self.n,
            "n_texts": int(self.group.unique().numel()),
            "n_outlier_rows": self.n_outliers,
        }


def outlier_rows(Z: torch.Tensor, factor: float) -> torch.Tensor:
    """Rows whose norm exceeds ``factor`` x the layer's median row norm in any layer. Z: (L, n, d)."""
    return norm_outliers(Z.norm(dim=-1), factor)


def drop_outliers(al: Aligned, factor: float) -> Aligned:
    """Drop massive-activation rows (Sun et al. 2024): attention-sink tokens whose residual norm is
    ~100x the median. A handful of them carries most of the centred Gram energy, so linear CKA and
    Procrustes would mostly compare those few tokens and every middle layer would look alike.

    ``factor <= 0`` keeps every row. Dropping rows never leaves fewer than half of them: if more
    than half would go, the threshold is not describing outliers and nothing is dropped.
    """
    if factor <= 0 or al.n < 4:
        return al
    bad = outlier_rows(al.X, factor) | outlier_rows(al.Y, factor)
    n_bad = int(bad.sum())
    if n_bad == 0 or n_bad > al.n // 2:
        return al
    keep = ~bad
    return Aligned(al.X[:, keep], al.Y[:, keep], al.group[keep.cpu()], al.mode, n_bad)


def _word_ids(cap: Capture) -> torch.Tensor:
    """Index of the (text, word) each row belongs to, or -1; words numbered globally.

    A row belongs to the word its character span overlaps most (the first such word on a tie);
    a row that overlaps no word (a space, a special token) gets -1. One overlap matrix per text
    (rows x words), in numpy."""
    assert cap.offsets is not None
    text_index = cap.text_index.numpy()
    offsets = cap.offsets.numpy()
    out = np.full(cap.n, -1, dtype=np.int64)
    base = 0
    for ti, text in enumerate(cap.texts):
        spans = np.array([(m.start(), m.end()) for m in _WORD.finditer(text)], dtype=np.int64).reshape(-1, 2)
        rows = np.flatnonzero(text_index == ti)
        if len(spans) and len(rows):
            a, b = offsets[rows, 0:1], offsets[rows, 1:2]  # (r, 1)
            overlap = np.minimum(b, spans[:, 1]) - np.maximum(a, spans[:, 0])  # (r, words)
            best = overlap.argmax(1)
            hit = overlap[np.arange(len(rows)), best] > 0
            out[rows[hit]] = base + best[hit]
        base += len(spans)
    return torch.from_numpy(out)


def ordered_add(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor, counts: torch.Tensor) -> None:
    """``out.index_add_(1, idx, src)`` with the CPU's order of additions on any device.

    CUDA's index_add_ adds with atomics in no fixed order, so the same rows pooled to other last bits
    from run to run (a CLI run and the app's differed at T4's 6th decimal). Here step j adds each
    group's j-th row, a plain indexed write to distinct groups: the CPU's sums, to the bit, every time.
    ``idx`` and ``counts`` (``bincount(idx)``) live on the CPU."""
    if not len(idx):
        return
    order = torch.argsort(idx, stable=True)
    g = idx[order]
    j = torch.arange(len(g)) - (torch.cumsum(counts, 0) - counts)[g]  # rank of each row in its group
    for step in range(int(counts.max())):
        at = j == step
        out[:, g[at].to(out.device)] += src[:, order[at].to(src.device)]


def _pool(resid: torch.Tensor, ids: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of rows per group id (ids == -1 dropped). resid: (L, n, d) -> (L, n_groups, d), counts."""
    keep = ids >= 0
    idx = ids[keep]
    src = resid if bool(keep.all()) else resid[:, keep.to(resid.device), :]  # no copy when every row counts
    out = torch.zeros(resid.shape[0], n_groups, resid.shape[2], dtype=resid.dtype, device=resid.device)
    counts = torch.bincount(idx, minlength=n_groups)  # on the CPU
    if resid.device.type == "cpu":
        out.index_add_(1, idx, src)
    else:
        ordered_add(out, idx, src, counts)
    counts = counts.to(resid.dtype)
    return out.div_(counts.clamp(min=1).view(1, -1, 1).to(resid.device)), counts


def _residuals(donor: Capture, target: Capture) -> tuple[torch.Tensor, torch.Tensor]:
    """Both residual streams on the GPU when both captures kept them on the same one, else on the CPU."""
    a, b = donor.rows(), target.rows()
    if a.device != b.device:
        a, b = donor.residual, target.residual
    return a, b


def align(donor: Capture, target: Capture) -> Aligned:
    """The aligned rows, on the GPU when both captures are there (``group`` is always on the CPU)."""
    if donor.texts != target.texts:
        raise GraftError("internal: captures were taken on different texts")
    RD, RT = _residuals(donor, target)
    if donor.token_ids == target.token_ids:
        return Aligned(RD, RT, donor.text_index.clone(), "token")
    if donor.offsets is not None and target.offsets is not None:
        wd, wt = _word_ids(donor), _word_ids(target)
        n_words = int(max(wd.max().item(), wt.max().item())) + 1
        Xd, cd = _pool(RD, wd, n_words)
        Yt, ct = _pool(RT, wt, n_words)
        both = (cd > 0) & (ct > 0)
        # text of each word: from whichever capture saw it (both did, for kept words)
        word_text = torch.full((n_words,), -1, dtype=torch.long)
        word_text[wd[wd >= 0]] = donor.text_index[wd >= 0]
        if int(both.sum()) < 2:
            raise GraftError("too few words shared by both tokenizations to align the models")
        on = both.to(Xd.device)
        return Aligned(Xd[:, on], Yt[:, on], word_text[both], "word")
    n_texts = len(donor.texts)
    Xd, _ = _pool(RD, donor.text_index, n_texts)
    Yt, _ = _pool(RT, target.text_index, n_texts)
    return Aligned(Xd, Yt, torch.arange(n_texts), "text")


@dataclass
class RowAlignment:
    """How rows of the base's and the target's captures pair up, in :func:`engine.measure.align.align`'s
    order (token / word / text), minus the massive-activation rows
    (:func:`engine.measure.align.drop_outliers`'s
    rule: residual norm above ``outlier_factor`` x the layer median in any layer of either model,
    unless that would drop more than half).

    ``base(T)`` / ``target(T)`` turn a capture's ``(n_model, d)`` rows into ``(n, d)`` aligned rows.
    """

    mode: str
    n_base: int
    n_target: int
    group: torch.Tensor  # (n,) text of each kept row
    keep: torch.Tensor  # (n_aligned,) bool: not an outlier
    n_outliers: int
    _base_ids: Optional[torch.Tensor] = None  # word / text id per base row (-1 = none); None in token mode
    _target_ids: Optional[torch.Tensor] = None
    _n_groups: int = 0
    _shared: Optional[torch.Tensor] = None  # (n_groups,) bool: seen by both

    @property
    def n(self) -> int:
        return int(self.keep.sum())

    def _rows(self, T: torch.Tensor, ids: Optional[torch.Tensor], n_model: int) -> torch.Tensor:
        if T.shape[0] != n_model:
            raise GraftError(f"internal: capture has {T.shape[0]} rows, expected {n_model}")
        if ids is None:
            return T[self.keep]
        pooled, _ = _pool(T.unsqueeze(0), ids, self._n_groups)  # (1, n_groups, d)
        return pooled[0][self._shared][self.keep]

    def base(self, T: torch.Tensor) -> torch.Tensor:
        return self._rows(T, self._base_ids, self.n_base)

    def target(self, T: torch.Tensor) -> torch.Tensor:
        return self._rows(T, self._target_ids, self.n_target)

    def summary(self) -> dict[str, Any]:
        return {
            "alignment": self.mode,
            "n_rows": self.n,
            "n_texts": int(self.group.unique().numel()),
            "n_outlier_rows": self.n_outliers,
        }


def row_alignment(
    cb: Capture, ct: Capture, outlier_factor: float
) -> tuple[RowAlignment, torch.Tensor, torch.Tensor]:
    """The row alignment of two residual captures, and their aligned residual streams
    ``(L_B+1, n, d_B)``, ``(L_T+1, n, d_T)`` with outlier rows dropped (what T2 compares)."""
    al = align(cb, ct)
    al = Aligned(al.X.cpu(), al.Y.cpu(), al.group, al.mode)  # the conjugation works on the CPU
    n = al.n
    keep = torch.ones(n, dtype=torch.bool)
    if outlier_factor > 0 and n >= 4:
        bad = outlier_rows(al.X, outlier_factor) | outlier_rows(al.Y, outlier_factor)
        if 0 < int(bad.sum()) <= n // 2:
            keep = ~bad
    ra = RowAlignment(al.mode, cb.n, ct.n, al.group[keep], keep, int((~keep).sum()))
    if al.mode == "word":
        wb, wt = _word_ids(cb), _word_ids(ct)
        ra._n_groups = int(max(wb.max().item(), wt.max().item())) + 1
        cnt_b = torch.bincount(wb[wb >= 0], minlength=ra._n_groups)
        cnt_t = torch.bincount(wt[wt >= 0], minlength=ra._n_groups)
        ra._base_ids, ra._target_ids, ra._shared = wb, wt, (cnt_b > 0) & (cnt_t > 0)
    elif al.mode == "text":
        ra._n_groups = len(cb.texts)
        ra._base_ids, ra._target_ids = cb.text_index, ct.text_index
        ra._shared = torch.ones(ra._n_groups, dtype=torch.bool)
    if (
        ra._shared is not None and int(ra._shared.sum()) != n
    ):  # pragma: no cover - guards the copy of align's logic
        raise GraftError("internal: module row alignment disagrees with engine.measure.align")
    return ra, al.X[:, keep], al.Y[:, keep]


def alignment_of(cb: Capture, ct: Capture) -> RowAlignment:
    """The row alignment of two captures from their tokenisations alone (no rows needed, so two
    streamed walkers can be aligned before any block is read): :func:`align`'s mode and rows, every
    row kept. :func:`outlier_keep` then sets ``keep`` from the rows' norms."""
    if cb.texts != ct.texts:
        raise GraftError("internal: captures were taken on different texts")
    if cb.token_ids == ct.token_ids:
        n = cb.n
        return RowAlignment("token", n, ct.n, cb.text_index.clone(), torch.ones(n, dtype=torch.bool), 0)
    if cb.offsets is not None and ct.offsets is not None:
        wb, wt = _word_ids(cb), _word_ids(ct)
        n_groups = int(max(wb.max().item(), wt.max().item())) + 1
        cnt_b = torch.bincount(wb[wb >= 0], minlength=n_groups)
        cnt_t = torch.bincount(wt[wt >= 0], minlength=n_groups)
        shared = (cnt_b > 0) & (cnt_t > 0)
        if int(shared.sum()) < 2:
            raise GraftError("too few words shared by both tokenizations to align the models")
        word_text = torch.full((n_groups,), -1, dtype=torch.long)
        word_text[wb[wb >= 0]] = cb.text_index[wb >= 0]
        n = int(shared.sum())
        return RowAlignment(
            "word",
            cb.n,
            ct.n,
            word_text[shared],
            torch.ones(n, dtype=torch.bool),
            0,
            wb,
            wt,
            n_groups,
            shared,
        )
    n_texts = len(cb.texts)
    return RowAlignment(
        "text", cb.n, ct.n, torch.arange(n_texts), torch.ones(n_texts, dtype=torch.bool), 0,
        cb.text_index, ct.text_index, n_texts, torch.ones(n_texts, dtype=torch.bool),
    )  # fmt: skip


def norm_outliers(norms: torch.Tensor, factor: float) -> torch.Tensor:
    """:func:`outlier_rows` from the rows' norms (L, n): rows above ``factor`` x the layer median."""
    med = norms.median(dim=1, keepdim=True).values.clamp_min(1e-12)
    return (norms > factor * med).any(dim=0)


def outlier_keep(
    ra: RowAlignment, norms_x: torch.Tensor, norms_y: torch.Tensor, factor: float
) -> RowAlignment:
    """``ra`` with :func:`drop_outliers`'s rule applied from every layer's row norms of both models
    ((L+1, n) each): the same rows dropped as the in-memory route drops, and the same refusal to drop
    more than half."""
    n = int(ra._shared.sum()) if ra._shared is not None else ra.n_base
    keep = torch.ones(n, dtype=torch.bool)
    if factor > 0 and n >= 4:
        bad = norm_outliers(norms_x, factor) | norm_outliers(norms_y, factor)
        if 0 < int(bad.sum()) <= n // 2:
            keep = ~bad
    group = ra.group if bool(ra.keep.all()) else None
    if group is None:
        raise GraftError("internal: outlier_keep wants the alignment before any row is dropped")
    return RowAlignment(
        ra.mode, ra.n_base, ra.n_target, group[keep], keep, int((~keep).sum()),
        ra._base_ids, ra._target_ids, ra._n_groups, ra._shared,
    )  # fmt: skip
