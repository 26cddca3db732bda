"""Rank-k conjugation transplant (METHODS.md, transplant operation 3; Model Surgery).

A donor's update ``dW`` (LoRA factors, or a full fine-tune's ``W_D - W_B`` factored by
:mod:`engine.lora`) was learnt on a *base* model B. Conjugation carries it into a *target* T whose
coordinates may differ (a rotated twin, another checkpoint, another architecture):

1. **Truncate** each module's ``dW = B A`` to rank ``k`` from its factors (T6): ``dW_k = B_k A_k``.
   ``k = 0`` keeps the module's full rank; ``energy`` picks per-module ``k`` as the smallest rank
   reaching that share of ``||dW||_F^2`` (:func:`engine.lora.k_at_energy`); both given: the
   smaller.
2. **Match layers**: base layer ``i`` -> target layer ``j`` by T2's monotone CKA matching of the
   residual streams (or a given ``layer_map``); the module with the same canonical name in
   target layer ``j`` receives the update. A canonical name the target lacks (GPT-2's fused
   ``attn.qkv`` vs Llama's ``attn.q``) is skipped with the reason.
3. **Fit one map per side** of each module on the activations that side actually sees, rows
   aligned as everywhere in Graft (token level with one tokenizer, words mean-pooled across
   tokenizers, texts as a last resort; massive-activation rows dropped like T2/T3):

   * input side: ``X_B ~ X_T M_in`` on the module's *inputs* (after the block's norm, so two
     models' norm gains differ there even when their residual streams are a pure rotation
     apart; for ``o`` the concatenated heads, for ``down`` the MLP hidden state);
   * output side: ``O_T ~ O_B M_out`` on the module's *outputs* (q/k/v: the head spaces; gate/up:
     the MLP hidden space; o/down: the residual stream).

   Row vectors, a module computes ``o = x W^T``. Then
   ``dO_T = dO_B M_out = x_B dW^T M_out ~ x_T M_in dW^T M_out``, i.e.

       dW_T = M_out^T dW_k M_in^T = (M_out^T B_k) (A_k M_in^T) = B_T A_T,

   which stays rank ``k`` in factored form: ``B_T`` is ``(out_T, k)``, ``A_T`` is ``(k, in_T)``.
4. **Add** ``B_T A_T`` to a working copy of T (:class:`Conjugation`: reversible, bit-exact
   rollback, the cached target never written), run the interference check
   (:mod:`engine.interference`, T12) and roll back when retained perplexity worsens past the
   user's threshold (:func:`apply_and_check`).

Maps act on raw activations
---------------------------
The map is folded into a weight, and a bias-free weight can absorb a linear map but no offset, so
every candidate is fitted *and judged* on uncentred rows (T3 centres; here centring would fit a
map to data the folded weight never sees). Procrustes carries an isotropic scale: T3 compares
sides after scaling both to unit norm, so a side that is a scaled rotation counts as explained
there; here the scale must be in the map, ``M = s R`` with ``R`` from
:func:`engine.linalg.procrustes_fit` (semi-orthogonal when widths differ; made unique when the fit
rows do not span the width) and ``s = <X R, Y> / ||X R||^2`` (least squares, clamped at 0).
Ridge is :func:`engine.linalg.ridge_map` on the raw rows (``alpha`` relative to the mean
eigenvalue of ``X^T X``). Ridge shrinks towards zero, so a fixed ``alpha`` biases even an exact
linear relation by about ``alpha`` (T3's 0.01 costs a rotated twin ~2.5% of the update); by
default (``ridge_alpha = 0``) each side picks ``alpha`` from :data:`RIDGE_GRID` (1e-8 .. 1) on an
inner validation split of the *fit* rows (:func:`choose_ridge_alpha`), so the held-out rows stay
untouched by every choice but the map kind.

Choosing the map of a side
--------------------------
Rows are split into fit and held-out parts as in T3 (whole texts held out when there are at least
4; seed ``seed``). Every candidate is fitted on the fit rows and scored by the normalised
held-out residual ``r = ||X_h M - Y_h||_F^2 / ||Y_h||_F^2`` (1.0 when ``Y_h`` is all zeros):

1. **identity** (equal widths only) when ``r_identity <= identity_tol`` (default
   :data:`IDENTITY_TOL` = 1e-4, an rms error of 1% of the side: the spaces coincide up to the
   rounding of a 16-bit model) or when no fitted map does better on held-out rows
   (``r_identity <= min(r_procrustes, r_ridge)``: a fit that does not generalise is not used);
2. else **procrustes** when ``r_procrustes <= r_ridge + procrustes_tol`` (default
   :data:`PROCRUSTES_TOL` = 0.01: a rotation is preferred unless an unconstrained map explains
   at least 1% more of the side's energy; it cannot amplify directions the rows barely sample);
3. else **ridge**.

When the identity is chosen by the first clause of rule 1 (or forced), the other candidates cannot
change the choice and are not fitted (their residuals are null) unless ``fit_all`` asks for them:
they cost an SVD and an eigendecomposition of a width x width matrix each, and the sides inside a
block (q/k/v/gate/up outputs, o/down inputs) are often exactly the identity. ``force`` overrides
the rule (``identity`` = plain merge, for ablations).
Each side reports the map, its held-out residual, every candidate's fit and held-out residuals,
the Procrustes scale, rank and whether it was underdetermined (rank of ``X^T Y`` below the
smaller width, e.g. fewer fit rows than the width).

Expected on a rotated twin (``h' = h Q``, norm gains ``g`` folded, :mod:`engine.twin`):
q/k/v/gate/up inputs ``X_B = X_T Q^T diag(g)`` (not a rotation: ridge), their outputs identical
(identity), o/down inputs identical (identity), o/down outputs ``O_T = O_B Q`` (procrustes, which
recovers ``Q``). A model against itself: every side identity and ``dW_T == dW`` exactly.

Memory: module rows are captured a group of base layers at a time (with the matched target
layers), each group bounded by ``capture_bytes``; modules reading one tensor (q/k/v, gate/up) share
one captured copy (:func:`engine.capture.capture`) and one fitted map.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .align import _pool, _word_ids, align, outlier_rows
from .arch import LinearModule
from .capture import Capture, CaptureCache, capture
from .errors import GraftError
from .linalg import cka_matrix, monotone_matching, procrustes_fit, residual, ridge_map, split_rows
from .models import LoadedModel, state_dict_hash
from .progress import Progress, silent
from .transplant import _module_tensors, extra_storage_bytes, save_transplant

if TYPE_CHECKING:  # pragma: no cover
    from .lora import ModuleDelta

IDENTITY_TOL = 1e-4
"""Held-out residual at or below which the identity is used (the spaces coincide)."""
PROCRUSTES_TOL = 0.01
"""Procrustes is used while its held-out residual is within this of the ridge map's."""
MAP_KINDS = ("identity", "procrustes", "ridge")
FORCE_CHOICES = ("auto",) + MAP_KINDS
DEFAULT_CAPTURE_BYTES = 2 << 30
RIDGE_GRID = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""Relative ridge strengths tried when ``ridge_alpha`` is 0 (auto), see :func:`choose_ridge_alpha`."""
RIDGE_FALLBACK = 1e-2  # auto alpha when the fit rows are too few to split (T3's default)
OPERATION = "rank-k conjugation"

ProgressLike = Union[Progress, Callable[[float, str], None], None]


# =============================================================================================
# One side: fit and choose the map
# =============================================================================================


@dataclass
class SideMap:
    """The map of one side of one module: ``X_dst ~ X_src @ matrix`` on the side's rows.

    Input side: ``X_src`` = target inputs, ``X_dst`` = base inputs (``M_in``, ``(in_T, in_B)``);
    output side: ``X_src`` = base outputs, ``X_dst`` = target outputs (``M_out``,
    ``(out_B, out_T)``). ``matrix`` is float64, ``None`` for the identity (or once dropped, see
    ``plan_conjugation(keep_maps=False)``; ``kind`` always says which map it was).
    """

    kind: str  # "identity" | "procrustes" | "ridge"
    matrix: Optional[torch.Tensor]  # (d_src, d_dst) float64; None = identity / dropped
    heldout_residual: float  # of the chosen map
    fit_residual: float
    residuals: dict[str, Optional[float]]  # held-out residual per candidate; None = not applicable / not fitted
    fit_residuals: dict[str, Optional[float]]
    scale: Optional[float]  # Procrustes isotropic scale s (M = s R)
    ridge_alpha: Optional[float]  # the ridge candidate's relative strength (chosen on an inner split when auto)
    rank: Optional[int]  # numerical rank of X^T Y on the fit rows (Procrustes)
    underdetermined: bool  # rank < min(d_src, d_dst): the orthogonal part was completed (engine.linalg)
    d_src: int
    d_dst: int
    n_fit: int
    n_heldout: int
    reason: str  # why this map

    def apply_right(self, X: torch.Tensor) -> torch.Tensor:
        """``X @ M`` (identity: ``X``)."""
        if self.kind == "identity":
            return X
        if self.matrix is None:
            raise GraftError("internal: the map's matrix was dropped (plan_conjugation(keep_maps=False))")
        return (X.double() @ self.matrix).to(X.dtype)

    def report(self) -> dict[str, Any]:
        return {
            "map": self.kind, "heldout_residual": _r(self.heldout_residual), "fit_residual": _r(self.fit_residual),
            "residuals": {k: _r(v) for k, v in self.residuals.items()},
            "fit_residuals": {k: _r(v) for k, v in self.fit_residuals.items()},
            "scale": _r(self.scale), "ridge_alpha": self.ridge_alpha, "rank": self.rank, "underdetermined": bool(self.underdetermined),
            "width_from": self.d_src, "width_to": self.d_dst, "n_fit": self.n_fit, "n_heldout": self.n_heldout,
            "reason": self.reason,
        }


def _r(x: Any, nd: int = 8) -> Optional[float]:
    if x is None or isinstance(x, bool):
        return None
    x = float(x)
    return round(x, nd) + 0.0 if math.isfinite(x) else None


def _res(pred: torch.Tensor, Y: torch.Tensor) -> float:
    """Normalised residual; 1.0 (nothing explained) when ``Y`` is all zeros."""
    r = residual(pred, Y)
    return r if math.isfinite(r) else 1.0


def choose_ridge_alpha(X: torch.Tensor, Y: torch.Tensor, group: Optional[torch.Tensor], seed: int = 0,
                       grid: Sequence[float] = RIDGE_GRID) -> float:
    """The ridge strength (relative, as :func:`engine.linalg.ridge_map`) with the lowest residual on
    an inner validation split of the fit rows (a quarter of their texts, or of the rows with fewer
    than 4 texts; seed ``seed + 1``); the held-out rows never take part. One eigendecomposition of
    ``X^T X`` serves the whole grid. X: (n_fit, dx), Y: (n_fit, dy), float64."""
    if group is None:
        group = torch.arange(X.shape[0])
    inner, val = split_rows(group, 0.25, seed + 1)
    if int(inner.sum()) < 1 or int(val.sum()) < 1:
        return RIDGE_FALLBACK
    Xi, Yi, Xv, Yv = X[inner], Y[inner], X[val], Y[val]
    G = Xi.T @ Xi
    e, V = torch.linalg.eigh(G)  # G = V diag(e) V^T
    C = V.T @ (Xi.T @ Yi)  # (dx, dy)
    XvV = Xv @ V
    mean_eig = float(torch.trace(G)) / G.shape[0]
    best, best_r = RIDGE_FALLBACK, math.inf
    for a in grid:
        lam = a * mean_eig
        r = _res(XvV @ (C / (e.clamp_min(0) + lam).unsqueeze(1)), Yv)
        if r < best_r - 1e-15:
            best, best_r = float(a), r
    return best


def fit_side(
    X_src: torch.Tensor,
    X_dst: torch.Tensor,
    fit: torch.Tensor,
    heldout: torch.Tensor,
    *,
    ridge_alpha: float = 0.0,
    identity_tol: float = IDENTITY_TOL,
    procrustes_tol: float = PROCRUSTES_TOL,
    force: str = "auto",
    group: Optional[torch.Tensor] = None,
    seed: int = 0,
    fit_all: bool = False,
) -> SideMap:
    """Fit ``X_dst ~ X_src M`` on the ``fit`` rows and choose the map by the rules of the module
    docstring, judged on the ``heldout`` rows. X_src: (n, d_src), X_dst: (n, d_dst), raw
    (uncentred) rows; fit / heldout: boolean (n,); group: (n,) text of each row (for the inner
    split that picks the ridge strength when ``ridge_alpha`` is 0); ``fit_all``: fit every candidate
    even where the choice does not need them. Computed in float64."""
    if force not in FORCE_CHOICES:
        raise GraftError(f"map must be one of {', '.join(FORCE_CHOICES)}, got {force!r}")
    X, Y = X_src.double(), X_dst.double()
    Xf, Yf, Xh, Yh = X[fit], Y[fit], X[heldout], Y[heldout]
    d_src, d_dst = int(X.shape[1]), int(Y.shape[1])
    n_fit, n_ho = int(fit.sum()), int(heldout.sum())
    if n_fit < 1 or n_ho < 1:
        raise GraftError("too few aligned rows to fit and test a map: use a larger workload or --max-tokens")
    same_width = d_src == d_dst
    held: dict[str, Optional[float]] = {k: None for k in MAP_KINDS}
    fitr: dict[str, Optional[float]] = {k: None for k in MAP_KINDS}
    mats: dict[str, Optional[torch.Tensor]] = {"identity": None}
    scale: Optional[float] = None
    alpha: Optional[float] = None
    rank: Optional[int] = None
    under = False
    if same_width:
        held["identity"], fitr["identity"] = _res(Xh, Yh), _res(Xf, Yf)
    if force == "identity" and not same_width:
        raise GraftError(f"identity map impossible: widths differ ({d_src} -> {d_dst})")
    coincide = held["identity"] is not None and held["identity"] <= identity_tol
    # Rule 1's first clause and a forced identity do not depend on the other candidates: skip their
    # fits (O(d^3) each) unless asked to report them.
    skip = not fit_all and ((force == "auto" and coincide) or force == "identity")
    if not skip:
        pf = procrustes_fit(Xf, Yf)
        XR = Xf @ pf.R
        den = float(XR.pow(2).sum())
        scale = max(float((XR * Yf).sum()) / den, 0.0) if den > 0 else 0.0
        mats["procrustes"] = scale * pf.R
        rank, under = pf.rank, pf.underdetermined
        held["procrustes"], fitr["procrustes"] = _res(Xh @ mats["procrustes"], Yh), _res(Xf @ mats["procrustes"], Yf)
        alpha = ridge_alpha if ridge_alpha > 0 else choose_ridge_alpha(
            Xf, Yf, None if group is None else group[fit], seed)
        W = ridge_map(Xf, Yf, alpha)
        mats["ridge"] = W
        held["ridge"], fitr["ridge"] = _res(Xh @ W, Yh), _res(Xf @ W, Yf)
    r_i, r_p, r_w = held["identity"], held["procrustes"], held["ridge"]
    if force != "auto":
        kind, reason = force, "forced"
    elif coincide:
        kind, reason = "identity", f"identity held-out residual {r_i:.3g} <= {identity_tol:g}: the spaces coincide"
    else:
        assert r_p is not None and r_w is not None
        if r_i is not None and r_i <= min(r_p, r_w):
            kind, reason = "identity", "no fitted map does better than the identity on held-out rows"
        elif r_p <= r_w + procrustes_tol:
            kind, reason = "procrustes", f"a rotation explains the side (held-out {r_p:.3g} vs ridge {r_w:.3g}, tolerance {procrustes_tol:g})"
        else:
            kind, reason = "ridge", f"not a rotation: ridge held-out {r_w:.3g} beats procrustes {r_p:.3g} by more than {procrustes_tol:g}"
    chosen_held, chosen_fit = held[kind], fitr[kind]
    assert chosen_held is not None and chosen_fit is not None
    return SideMap(kind=kind, matrix=mats.get(kind), heldout_residual=chosen_held, fit_residual=chosen_fit,
                   residuals=held, fit_residuals=fitr, scale=scale, ridge_alpha=alpha, rank=rank, underdetermined=under,
                   d_src=d_src, d_dst=d_dst, n_fit=n_fit, n_heldout=n_ho, reason=reason)


# =============================================================================================
# Row alignment of module rows (engine.align, generalised from the residual stream to any rows)
# =============================================================================================


@dataclass
class RowAlignment:
    """How rows of the base's and the target's captures pair up, in :func:`engine.align.align`'s
    order (token / word / text), minus the massive-activation rows (:func:`engine.align.drop_outliers`'s
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
        return {"alignment": self.mode, "n_rows": self.n, "n_texts": int(self.group.unique().numel()),
                "n_outlier_rows": self.n_outliers}


def row_alignment(cb: Capture, ct: Capture, outlier_factor: float) -> tuple[RowAlignment, torch.Tensor, torch.Tensor]:
    """The row alignment of two residual captures, and their aligned residual streams
    ``(L_B+1, n, d_B)``, ``(L_T+1, n, d_T)`` with outlier rows dropped (what T2 compares)."""
    al = align(cb, ct)
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
    if ra._shared is not None and int(ra._shared.sum()) != n:  # pragma: no cover - guards the copy of align's logic
        raise GraftError("internal: module row alignment disagrees with engine.align")
    return ra, al.X[:, keep], al.Y[:, keep]


# =============================================================================================
# The plan
# =============================================================================================


@dataclass
class ModulePlan:
    """One donor module: where it goes, its maps and its factors in the target's coordinates."""

    name: str  # base/donor module, e.g. "blocks.3.attn.q"
    layer: int
    canonical: str  # "attn.q"
    kind: str  # "attention" | "mlp"
    rank: int  # rank of the donor's factors
    k: int  # rank kept
    energy_kept: float  # ||dW_k||_F^2 / ||dW||_F^2
    delta_norm: float  # ||dW_k||_F (base coordinates)
    status: str = "skipped"  # "conjugated" | "skipped"
    reason: str = ""
    target_name: Optional[str] = None
    target_layer: Optional[int] = None
    input: Optional[SideMap] = None  # M_in: target inputs -> base inputs
    output: Optional[SideMap] = None  # M_out: base outputs -> target outputs
    B: Optional[torch.Tensor] = field(default=None, repr=False)  # (out_T, k)
    A: Optional[torch.Tensor] = field(default=None, repr=False)  # (k, in_T)
    target_delta_norm: Optional[float] = None  # ||B_T A_T||_F

    def report(self) -> dict[str, Any]:
        return {
            "name": self.name, "layer": self.layer, "canonical": self.canonical, "kind": self.kind,
            "target_name": self.target_name, "target_layer": self.target_layer,
            "status": self.status, "reason": self.reason,
            "rank": self.rank, "k": self.k, "energy_kept": _r(self.energy_kept),
            "delta_norm": _r(self.delta_norm), "target_delta_norm": _r(self.target_delta_norm),
            "input": self.input.report() if self.input else None,
            "output": self.output.report() if self.output else None,
        }


@dataclass
class ConjugationPlan:
    """Everything :class:`Conjugation` needs, and the JSON-able account of how it was decided."""

    base_label: str
    target_label: str
    modules: list[ModulePlan]
    layer_map: list[tuple[int, int]]
    layer_map_source: str  # "T2 matching" | "given" | "identity (same model)"
    alignment: dict[str, Any]  # RowAlignment.summary() + n_fit / n_heldout
    params: dict[str, Any]
    warnings: list[str]
    seconds: dict[str, float]

    @property
    def conjugated(self) -> list[ModulePlan]:
        return [m for m in self.modules if m.status == "conjugated"]

    @property
    def skipped(self) -> list[ModulePlan]:
        return [m for m in self.modules if m.status != "conjugated"]

    def target_modules(self) -> list[str]:
        """Target modules that receive an update, in order of first appearance."""
        return list(dict.fromkeys(m.target_name for m in self.conjugated if m.target_name))

    def map_counts(self) -> dict[str, dict[str, int]]:
        out = {side: {k: 0 for k in MAP_KINDS} for side in ("input", "output")}
        for m in self.conjugated:
            out["input"][m.input.kind] += 1  # type: ignore[union-attr]
            out["output"][m.output.kind] += 1  # type: ignore[union-attr]
        return out

    def report(self) -> dict[str, Any]:
        conj = self.conjugated
        return {
            "base": self.base_label, "target": self.target_label,
            "layer_map": [list(p) for p in self.layer_map], "layer_map_source": self.layer_map_source,
            **self.alignment,
            "params": dict(self.params),
            "n_modules": len(self.modules), "n_conjugated": len(conj), "n_skipped": len(self.modules) - len(conj),
            "n_target_modules": len(self.target_modules()),
            "map_counts": self.map_counts(),
            "mean_energy_kept": _r(sum(m.energy_kept for m in conj) / len(conj)) if conj else None,
            "modules": [m.report() for m in self.modules],
            "skipped": [{"name": m.name, "reason": m.reason} for m in self.skipped],
            "warnings": list(self.warnings),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def _progress(p: ProgressLike) -> Progress:
    if p is None:
        return silent()
    if isinstance(p, Progress):
        return p
    return Progress(p)


def _fro_factored(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B A||_F from the factors: sqrt(tr((B^T B)(A A^T)))."""
    Bd, Ad = B.double(), A.double()
    return math.sqrt(max(float(((Bd.T @ Bd) * (Ad @ Ad.T)).sum()), 0.0))


def _truncate(delta: "ModuleDelta", k: int, energy: Optional[float]) -> tuple["ModuleDelta", int, int, float]:
    """(truncated delta, its rank, k kept, energy kept). Energy is the share of the exact
    ``||dW||_F^2`` (:meth:`engine.lora.ModuleDelta.norm_sq`: a full fine-tune's factors may already be
    a truncation of it). A zero update keeps k = 0."""
    rank = int(delta.rank)
    total = float(delta.norm_sq())
    if not (total > 0 and math.isfinite(total)):
        return delta, rank, 0, 0.0
    if (k <= 0 or k >= rank) and not energy:
        return delta, rank, rank, min(1.0, _fro_factored(delta.B, delta.A) ** 2 / total)
    from .lora import factored_svd, k_at_energy, truncate

    _, S, _ = factored_svd(delta.B, delta.A)
    S2 = S.double().pow(2)
    kk = len(S) if k <= 0 else min(k, len(S))
    if energy:
        ke = k_at_energy(S, energy, total=total if delta.frob_norm is not None else None)
        kk = min(kk, len(S) if ke is None else int(ke))
    if kk <= 0:
        return delta, rank, 0, 0.0
    return truncate(delta, kk), rank, kk, min(1.0, float(S2[:kk].sum()) / total)


def _layer_groups(layers: list[int], bytes_of: Callable[[int], int], budget: int) -> list[list[int]]:
    groups: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for l in layers:
        b = bytes_of(l)
        if cur and used + b > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(l)
        used += b
    if cur:
        groups.append(cur)
    return groups


@torch.no_grad()
def plan_conjugation(
    base: LoadedModel,
    target: LoadedModel,
    deltas: Sequence["ModuleDelta"],
    texts: Sequence[str],
    *,
    k: int = 0,
    energy: Optional[float] = None,
    layer_map: Optional[Sequence[tuple[int, int]]] = None,
    ridge_alpha: float = 0.0,
    heldout_fraction: float = 0.25,
    seed: int = 0,
    outlier_factor: float = 20.0,
    identity_tol: float = IDENTITY_TOL,
    procrustes_tol: float = PROCRUSTES_TOL,
    force: str = "auto",
    batch_size: int = 8,
    captures: Optional[CaptureCache] = None,
    capture_bytes: int = DEFAULT_CAPTURE_BYTES,
    keep_maps: bool = False,
    fit_all: bool = False,
    progress: ProgressLike = None,
) -> ConjugationPlan:
    """Plan the conjugation of ``deltas`` (relative to ``base``) into ``target`` on ``texts``
    (already budgeted, :func:`engine.capture.budget_texts`). See the module docstring.

    ``k``: rank kept per module (0 = full); ``ridge_alpha``: relative ridge strength, 0 = chosen
    per side on an inner split of the fit rows; ``energy`` in (0, 1]: per-module rank reaching that
    energy share (None/0 = off); ``layer_map``: base -> target layer pairs (default: T2's monotone
    CKA matching on the same texts, computed here); ``force``: ``auto`` or one map kind for every
    side; ``captures``: a :class:`CaptureCache` for the residual capture (shared with T2-T4);
    ``capture_bytes``: memory bound of one group of module captures; ``keep_maps``: keep each side's
    matrix on the plan (tests, inspection) instead of only its factors' product; ``fit_all``: fit
    every candidate map of every side, also where the identity is chosen without them (slower).
    Base and target being one model object, the layer map defaults to the identity (T2 of a model
    against itself is its diagonal) and one capture serves both sides.
    """
    progress = _progress(progress)
    t_start = time.perf_counter()
    if force not in FORCE_CHOICES:
        raise GraftError(f"map must be one of {', '.join(FORCE_CHOICES)}, got {force!r}")
    if k < 0:
        raise GraftError(f"k must be >= 0 (0 = each module's full rank), got {k}")
    if energy is not None and energy != 0 and not (0 < energy <= 1):
        raise GraftError(f"energy must be in (0, 1], got {energy}")
    if not (0 < heldout_fraction < 1):
        raise GraftError(f"heldout fraction must be in (0, 1), got {heldout_fraction}")
    if ridge_alpha < 0:
        raise GraftError(f"ridge alpha must be >= 0, got {ridge_alpha}")
    if not deltas:
        raise GraftError("no module deltas to conjugate")
    texts = list(texts)
    bmods = {m.name: m for m in base.arch.linear_modules()}
    tmods = {m.name: m for m in target.arch.linear_modules()}
    L_B, L_T = base.arch.n_layers, target.arch.n_layers

    # -- 1. validate and truncate the deltas -------------------------------------------------
    plans: list[ModulePlan] = []
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # index in plans -> (B_k, A_k)
    seen: set[str] = set()
    for d in deltas:
        if d.name in seen:
            raise GraftError(f"module {d.name} appears twice among the deltas")
        seen.add(d.name)
        bm = bmods.get(d.name)
        if bm is None or int(getattr(d, "layer", 0)) < 0 or not getattr(d, "known", True):
            # LoRA outside the blocks (lm_head, embeddings) or on a module no layout names.
            plans.append(ModulePlan(name=d.name, layer=int(getattr(d, "layer", -1)), canonical=getattr(d, "module", d.name),
                                    kind=getattr(d, "kind", "other"), rank=int(d.B.shape[1]), k=0, energy_kept=0.0,
                                    delta_norm=_fro_factored(d.B, d.A),
                                    reason=f"{d.name} is not a block linear module of the base {base.label}"))
            continue
        out_b, in_b = bm.shape
        if d.B.ndim != 2 or d.A.ndim != 2 or d.B.shape[0] != out_b or d.A.shape[1] != in_b or d.B.shape[1] != d.A.shape[0]:
            raise GraftError(f"delta of {d.name} has factors {list(d.B.shape)} x {list(d.A.shape)}, "
                             f"which do not make the base's ({out_b}, {in_b}) weight: wrong base model?")
        if not (torch.isfinite(d.B).all() and torch.isfinite(d.A).all()):
            raise GraftError(f"delta of {d.name} has non-finite values")
        dk, rank, kk, kept = _truncate(d, k, energy)
        mp = ModulePlan(name=d.name, layer=bm.layer, canonical=bm.canonical, kind=bm.kind, rank=rank, k=kk,
                        energy_kept=kept, delta_norm=_fro_factored(dk.B, dk.A) if kk else 0.0)
        if kk:
            factors[len(plans)] = (dk.B, dk.A)
        else:
            mp.reason = "the delta is zero"
        plans.append(mp)
    progress(0.02, f"{len(plans)} module deltas truncated")

    # -- 2. residual capture, row alignment, layer matching -----------------------------------
    same_model = base.model is target.model
    pr = progress.sub(0.02, 0.2)
    t0 = time.perf_counter()
    if captures is not None:
        cb = captures.get(base, texts, batch_size=batch_size, progress=pr.sub(0, 0.5))
        ct = cb if same_model else captures.get(target, texts, batch_size=batch_size, progress=pr.sub(0.5, 1))
    else:
        cb = capture(base, texts, batch_size=batch_size, progress=pr.sub(0, 0.5))
        ct = cb if same_model else capture(target, texts, batch_size=batch_size, progress=pr.sub(0.5, 1))
    ra, XB, YT = row_alignment(cb, ct, outlier_factor)
    fit, held = split_rows(ra.group, heldout_fraction, seed)
    if int(fit.sum()) < 2 or int(held.sum()) < 1:
        raise GraftError("too few aligned rows to hold some out: use a larger workload or --max-tokens")
    if layer_map is None and same_model:
        pairs = [(i, i) for i in range(L_B)]
        source = "identity (same model)"
    elif layer_map is None:
        progress(0.2, "T2: matching base layers to target layers (CKA)")
        S = cka_matrix(XB[1:], YT[1:], progress.sub(0.2, 0.25))
        pairs = monotone_matching(S)
        source = "T2 matching"
    else:
        pairs = [(int(i), int(j)) for i, j in layer_map]
        source = "given"
        for i, j in pairs:
            if not (0 <= i < L_B and 0 <= j < L_T):
                raise GraftError(f"layer pair ({i}, {j}) is out of range: the base has {L_B} layers, the target {L_T}")
    del XB, YT
    lmap: dict[int, int] = {}
    for i, j in pairs:
        if i in lmap and lmap[i] != j:
            raise GraftError(f"base layer {i} is mapped to two target layers ({lmap[i]} and {j})")
        lmap[i] = j
    t_match = time.perf_counter() - t0

    # -- 3. which target module each delta goes to ----------------------------------------------
    todo: list[int] = []
    for idx, mp in enumerate(plans):
        if idx not in factors:
            continue
        j = lmap.get(mp.layer)
        if j is None:
            mp.reason = f"base layer {mp.layer} has no matched target layer"
            continue
        tname = f"blocks.{j}.{mp.canonical}"
        mp.target_layer = j
        if tname not in tmods:
            have = sorted({m.canonical for m in tmods.values()})
            mp.reason = (f"the target ({target.arch.family}) has no {mp.canonical} module "
                         f"(it has {', '.join(have)})")
            continue
        mp.target_name = tname
        todo.append(idx)

    # -- 4. capture module rows a group of base layers at a time and fit the maps -----------
    def module_bytes(idx: int) -> int:
        mp = plans[idx]
        ob, ib = bmods[mp.name].shape
        ot, it = tmods[mp.target_name].shape  # type: ignore[index]
        return 4 * ((ob + ib) * ra.n_base + (0 if same_model else (ot + it) * ra.n_target))

    by_layer: dict[int, list[int]] = {}
    for idx in todo:
        by_layer.setdefault(plans[idx].layer, []).append(idx)
    groups = _layer_groups(sorted(by_layer), lambda l: sum(module_bytes(i) for i in by_layer[l]), capture_bytes)
    t_capture = t_fit = 0.0
    fit_kw = dict(ridge_alpha=ridge_alpha, identity_tol=identity_tol, procrustes_tol=procrustes_tol, force=force,
                  group=ra.group, seed=seed, fit_all=fit_all)
    for g, layers in enumerate(groups):
        pg = progress.sub(0.25 + 0.75 * g / len(groups), 0.25 + 0.75 * (g + 1) / len(groups))
        idxs = [i for l in layers for i in by_layer[l]]
        bnames = [plans[i].name for i in idxs]
        tnames = list(dict.fromkeys(plans[i].target_name for i in idxs))  # type: ignore[misc]
        t1 = time.perf_counter()
        what = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
        if same_model:
            names = list(dict.fromkeys(bnames + tnames))  # type: ignore[operator]
            gb = capture(base, texts, modules=names, module_inputs=names, residual=False, batch_size=batch_size,
                         progress=pg.sub(0, 0.6))
            gt = gb
        else:
            gb = capture(base, texts, modules=bnames, module_inputs=bnames, residual=False, batch_size=batch_size,
                         progress=pg.sub(0, 0.3))
            gt = capture(target, texts, modules=tnames, module_inputs=tnames, residual=False,  # type: ignore[arg-type]
                         batch_size=batch_size, progress=pg.sub(0.3, 0.6))
        if gb.token_ids != cb.token_ids or gt.token_ids != ct.token_ids:
            raise GraftError("internal: a module capture tokenised the texts differently from the residual capture")
        t_capture += time.perf_counter() - t1
        t2 = time.perf_counter()
        rows: dict[tuple[str, int], torch.Tensor] = {}  # ("b"|"t", id(raw tensor)) -> aligned rows
        sides: dict[tuple[int, int], SideMap] = {}  # (id(src raw), id(dst raw)) -> map; shared inputs fit once

        def aligned(which: str, T: torch.Tensor) -> torch.Tensor:
            key = (which, id(T))
            if key not in rows:
                rows[key] = ra.base(T) if which == "b" else ra.target(T)
            return rows[key]

        def side(src: tuple[str, torch.Tensor], dst: tuple[str, torch.Tensor]) -> SideMap:
            key = (id(src[1]), id(dst[1]))
            if key not in sides:
                sides[key] = fit_side(aligned(*src), aligned(*dst), fit, held, **fit_kw)
            return sides[key]

        for n_done, idx in enumerate(idxs):
            mp = plans[idx]
            pg(0.6 + 0.4 * n_done / len(idxs), f"fitting maps, {what}: {mp.name} -> {mp.target_name}")
            tn = mp.target_name
            try:
                m_in = side(("t", gt.module_inputs[tn]), ("b", gb.module_inputs[mp.name]))  # type: ignore[index]
                m_out = side(("b", gb.modules[mp.name]), ("t", gt.modules[tn]))  # type: ignore[index]
            except GraftError as e:
                if force == "auto":
                    raise
                mp.reason = str(e)
                continue
            Bk, Ak = factors[idx]
            # dW_T = M_out^T dW_k M_in^T = (M_out^T B_k)(A_k M_in^T); identity sides keep the factors as they are.
            B_T = Bk if m_out.kind == "identity" else (m_out.matrix.T @ Bk.double()).to(Bk.dtype)  # type: ignore[union-attr]
            A_T = Ak if m_in.kind == "identity" else (Ak.double() @ m_in.matrix.T).to(Ak.dtype)  # type: ignore[union-attr]
            mp.B, mp.A = B_T, A_T
            mp.input, mp.output = m_in, m_out
            mp.target_delta_norm = _fro_factored(B_T, A_T)
            mp.status, mp.reason = "conjugated", ""
        if not keep_maps:
            for sm in sides.values():
                sm.matrix = None
        rows.clear()
        sides.clear()
        del gb, gt
        t_fit += time.perf_counter() - t2
    progress(1.0, "conjugation planned")

    conj = [m for m in plans if m.status == "conjugated"]
    warnings: list[str] = []
    if not conj:
        warnings.append("no module could be conjugated: " + "; ".join(sorted({m.reason for m in plans}))[:300])
    n_fit = int(fit.sum())
    chosen = [s for m in conj for s in (m.input, m.output) if s is not None]
    # An underdetermined rotation matters only where held-out rows leave the fit rows' span.
    under = [s for s in chosen if s.kind == "procrustes" and s.underdetermined and s.heldout_residual > identity_tol]
    if under:
        widths = sorted({min(s.d_src, s.d_dst) for s in under})
        warnings.append(f"{len(under)} module side(s) use an underdetermined rotation: the fit rows ({n_fit}) do not "
                        f"span width(s) {', '.join(map(str, widths))}, so it was completed off their span "
                        "(engine.linalg.procrustes_fit) and held-out rows show it — use a larger workload or --max-tokens")
    thin = [s for s in chosen if s.kind == "ridge" and n_fit < s.d_src]
    if thin:
        widths = sorted({s.d_src for s in thin})
        warnings.append(f"{len(thin)} ridge side(s) are fitted on fewer rows ({n_fit}) than their input width(s) "
                        f"({', '.join(map(str, widths))}): directions the rows do not reach are shrunk to zero — "
                        "use a larger workload or --max-tokens")
    poor = [s for s in chosen if s.heldout_residual > 0.5]
    if poor:
        warnings.append(f"{len(poor)} side map(s) leave more than half of the held-out energy unexplained "
                        "(held-out residual > 0.5): the update may not carry over there")
    return ConjugationPlan(
        base_label=base.label, target_label=target.label, modules=plans, layer_map=sorted(lmap.items()),
        layer_map_source=source,
        alignment={**ra.summary(), "n_fit": int(fit.sum()), "n_heldout": int(held.sum())},
        params={"k": k, "energy": energy or None, "ridge_alpha": ridge_alpha, "heldout_fraction": heldout_fraction,
                "seed": seed, "outlier_factor": outlier_factor, "identity_tol": identity_tol,
                "procrustes_tol": procrustes_tol, "map": force},
        warnings=warnings,
        seconds={"match": t_match, "module_capture": t_capture, "fit": t_fit, "total": time.perf_counter() - t_start},
    )


# =============================================================================================
# The reversible edit
# =============================================================================================


def working_copy(target: LoadedModel, touched: Iterable[torch.Tensor]) -> nn.Module:
    """A structural copy of ``target.model`` sharing every tensor except ``touched``, which get new
    storage holding the target's values (the mechanism of :meth:`engine.transplant.ModuleSwap.materialise`)."""
    ids = {id(t) for t in touched}
    # inference_mode(False): new tensors made under inference mode could not be written later.
    with target.lock, torch.inference_mode(False):  # a capture holds the lock while its hooks are attached
        memo: dict[int, Any] = {id(t): t for t in _module_tensors(target.model) if t is not None and id(t) not in ids}
        working = copy.deepcopy(target.model, memo)
    working.eval()
    return working



class Conjugation:
    """Add a plan's ``B_T A_T`` to the weights of a working copy of ``target``, reversibly.

    Like :class:`engine.transplant.ModuleSwap`: the cached target is never written; the working
    copy shares every tensor except the touched weights (biases are never touched); the original
    of a touched weight is the cached target's tensor, so recording it costs nothing and
    :meth:`rollback` is a bit-exact ``copy_``. Several base modules matched to one target module
    (more base layers than target layers) add up there. The update is summed in float64 and
    rounded once to the weight's dtype; GPT-2 ``Conv1D`` weights (stored ``(in, out)``) get its
    transpose. ``modules`` restricts the edit to some target modules (default: all of the plan's).
    """

    def __init__(self, target: LoadedModel, plan: ConjugationPlan, modules: Optional[Sequence[str]] = None) -> None:
        if plan.target_label != target.label:
            raise GraftError(f"the plan was made for {plan.target_label}, not {target.label}")
        tmods = {m.name: m for m in target.arch.linear_modules()}
        names = plan.target_modules()
        if modules is not None:
            wanted = list(dict.fromkeys(m.strip() for m in modules if m and m.strip()))
            unknown = [m for m in wanted if m not in names]
            if unknown:
                raise GraftError(f"module {unknown[0]} receives no update in this plan")
            names = wanted
        if not names:
            raise GraftError("nothing to conjugate: the plan has no conjugated module")
        self.target = target
        self.plan = plan
        self.modules: tuple[str, ...] = tuple(names)
        self.linear: dict[str, LinearModule] = {n: tmods[n] for n in names}
        self.sources: dict[str, list[ModulePlan]] = {n: [] for n in names}
        for mp in plan.conjugated:
            if mp.target_name in self.sources:
                self.sources[mp.target_name].append(mp)  # type: ignore[index]
        for n, lm in self.linear.items():
            out_t, in_t = lm.shape
            for mp in self.sources[n]:
                if mp.B is None or mp.A is None or mp.B.shape[0] != out_t or mp.A.shape[1] != in_t:
                    raise GraftError(f"the plan's update for {n} does not fit the target's ({out_t}, {in_t}) weight")
        self._working: Optional[nn.Module] = None
        self._saved: dict[str, torch.Tensor] = {}  # module -> original weight (the cached target's tensor)
        self._hash_before: Optional[str] = None
        self._check_not_tied()

    def _weight(self, root_is_target: bool, name: str) -> torch.Tensor:
        path = self.linear[name].path
        return (self.target.arch.module(path) if root_is_target else self.working.get_submodule(path)).weight

    def _check_not_tied(self) -> None:
        counts: dict[int, int] = {}
        for _, p in self.target.model.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        for n in self.modules:
            if counts.get(id(self._weight(True, n)), 0) > 1:
                raise GraftError(f"cannot conjugate into {n}: its weight is tied to another parameter")

    @property
    def working(self) -> nn.Module:
        if self._working is None:
            raise GraftError("internal: call materialise() before using the working model")
        return self._working

    @property
    def applied(self) -> tuple[str, ...]:
        return tuple(m for m in self.modules if m in self._saved)

    @property
    def touched_bytes(self) -> int:
        return sum(self._weight(True, n).nbytes for n in self.modules)

    @property
    def swapped_bytes(self) -> int:
        """Bytes of the weights this edit holds copies of (the name the live-transplant view reads)."""
        return self.touched_bytes

    def materialise(self) -> nn.Module:
        """The working model (idempotent); extra memory = :attr:`touched_bytes`."""
        if self._working is None:
            self._working = working_copy(self.target, [self._weight(True, n) for n in self.modules])
            for n in self.modules:
                if self._weight(False, n).data_ptr() == self._weight(True, n).data_ptr():  # pragma: no cover
                    raise GraftError(f"internal: {n} still shares storage with the cached target")
        return self._working

    def delta(self, name: str) -> torch.Tensor:
        """The summed update of one target module, ``(out, in)`` float64 on the CPU."""
        out = None
        for mp in self.sources[name]:
            d = mp.B.double() @ mp.A.double()  # type: ignore[union-attr]
            out = d if out is None else out + d
        assert out is not None
        return out

    @torch.no_grad()
    def apply(self, modules: Optional[Sequence[str]] = None) -> tuple[str, ...]:
        """Add the update to ``modules`` (default all); already applied ones are left alone."""
        self.materialise()
        chosen = self.modules if modules is None else tuple(modules)
        unknown = [m for m in chosen if m not in self.linear]
        if unknown:
            raise GraftError(f"module {unknown[0]} is not part of this conjugation")
        done = []
        for n in chosen:
            if n in self._saved:
                continue
            dst = self._weight(False, n)
            orig = self._weight(True, n)
            dW = self.delta(n).to(dst.device)
            if self.linear[n].conv1d:
                dW = dW.T
            new = (orig.double() + dW).to(dst.dtype)
            if not torch.isfinite(new).all():
                raise GraftError(f"the conjugated update makes {n} non-finite")
            self._saved[n] = orig
            dst.copy_(new)
            done.append(n)
        return tuple(done)

    @torch.no_grad()
    def rollback(self) -> int:
        """Restore every touched weight, bit-exactly. Returns how many."""
        if self._working is None:
            return 0
        n = 0
        for name in list(self._saved):
            self._weight(False, name).copy_(self._saved.pop(name))
            n += 1
        return n

    def hash_before(self) -> str:
        if self._hash_before is None:
            self._hash_before = self.target.state_hash()
        return self._hash_before

    def weight_hash(self) -> str:
        return state_dict_hash(self.working.state_dict())

    def verify_rollback(self) -> bool:
        a, b = self.working.state_dict(), self.target.model.state_dict()
        if a.keys() != b.keys():
            return False
        return all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)

    def extra_bytes(self) -> int:
        return extra_storage_bytes(self.working, self.target.model)

    def report(self) -> dict[str, Any]:
        return {
            "target_modules": [{"name": n, "sources": [mp.name for mp in self.sources[n]],
                                "rank": sum(int(mp.B.shape[1]) for mp in self.sources[n])}  # type: ignore[union-attr]
                               for n in self.modules],
            "applied": list(self.applied),
            "n_tensors": len(self.modules),
            "touched_bytes": self.touched_bytes,
            "weight_hash_before": self.hash_before(),
        }

    def card(self, **extra: Any) -> dict[str, Any]:
        """A ``surgery.json`` card (:func:`engine.transplant.save_transplant` adds the saved hash)."""
        return {
            "operation": OPERATION,
            "base": self.plan.base_label,
            "target": self.target.spec.ref,
            "target_modules": list(self.applied or self.modules),
            "weight_hash_before": self.hash_before(),
            "weight_hash_after": self.weight_hash() if self._working is not None else None,
            "plan": {k: v for k, v in self.plan.report().items() if k != "seconds"},
            **extra,
        }

    def save(self, out_dir: str, **card: Any) -> str:
        """Save the working copy (with what is applied now) as a Hugging Face folder + surgery.json."""
        return str(save_transplant(self.materialise(), self.target.tokenizer, out_dir, self.card(**card)))


def apply_and_check(
    conj: Conjugation,
    retained_texts: Sequence[str],
    *,
    max_ppl_increase: Optional[float] = 0.05,
    min_locality: Optional[float] = None,
    max_new_tokens: int = 16,
    prompt_tokens: int = 16,
    batch_size: int = 8,
    progress: ProgressLike = None,
) -> dict[str, Any]:
    """Apply ``conj``, run the interference check (T12) of T' against T on ``retained_texts`` and
    roll back automatically when :func:`engine.interference.should_roll_back` says so.

    Returns ``{interference, rolled_back, roll_back_reason, weight_hash_before, weight_hash_after,
    rollback_bit_exact (None unless rolled back), target_untouched}``."""
    from .interference import interference, should_roll_back

    progress = _progress(progress)
    h0 = conj.hash_before()
    progress(0.0, "adding the conjugated update to the working copy")
    conj.apply()
    h1 = conj.weight_hash()
    with conj.target.lock:  # the cached target is evaluated: no capture may hook it meanwhile
        rep = interference(conj.target.model, conj.working, conj.target.tokenizer, retained_texts,
                           max_new_tokens=max_new_tokens, prompt_tokens=prompt_tokens, batch_size=batch_size,
                           progress=progress.sub(0.05, 0.95))
    roll, why = should_roll_back(rep, max_ppl_increase, min_locality=min_locality)
    exact = None
    if roll:
        progress(0.96, "rolling back: " + why)
        conj.rollback()
        exact = conj.weight_hash() == h0 and conj.verify_rollback()
    progress(1.0, "interference checked")
    return {"interference": rep, "rolled_back": roll, "roll_back_reason": why,
            "weight_hash_before": h0, "weight_hash_after": h1, "rollback_bit_exact": exact,
            "target_untouched": conj.target.state_hash() == h0}
