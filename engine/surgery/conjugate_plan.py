"""Planning a rank-k conjugation (:mod:`engine.surgery.conjugate`): truncate each module's update to rank
``k``, match base layers to target layers (T2), capture the rows each module's sides see, fit one
map per side (:func:`engine.surgery.conjugate_maps.fit_side`) and express the factors in the target's
coordinates, ``B_T = M_out^T B_k``, ``A_T = A_k M_in^T``. The result is a
:class:`engine.surgery.conjugate.ConjugationPlan`, which :class:`engine.surgery.conjugate.Conjugation`
applies.

Memory: module rows are captured a group of base layers at a time (with the matched target
layers), each group bounded by ``capture_bytes``; modules reading one tensor (q/k/v, gate/up) share
one captured copy (:func:`engine.measure.capture.capture`) and one fitted map.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from ..core.errors import GraftError
from ..core.progress import ProgressLike, as_progress
from ..loading.models import LoadedModel
from ..measure.align import row_alignment
from ..measure.capture_cache import CaptureCache
from ..measure.capture_cache import capture_model as capture
from ..measure.cka import choose_estimator, cka_matrix
from ..measure.linalg import monotone_matching, split_rows
from .conjugate import ConjugationPlan
from .conjugate_deltas import fro_factored, validate_and_truncate
from .conjugate_maps import FORCE_CHOICES, IDENTITY_TOL, PROCRUSTES_TOL, SideMap, fit_side

if TYPE_CHECKING:  # pragma: no cover
    from ..adapters.lowrank import ModuleDelta

DEFAULT_CAPTURE_BYTES = 2 << 30


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
    (already budgeted, :func:`engine.measure.capture.budget_texts`). See :mod:`engine.surgery.conjugate`.

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
    progress = as_progress(progress)
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
    plans, factors = validate_and_truncate(deltas, base, k, energy)
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
        S = cka_matrix(
            XB[1:],
            YT[1:],
            progress.sub(0.2, 0.25),
            estimator=choose_estimator(int(XB.shape[1]), int(XB.shape[2]), int(YT.shape[2])),
        )
        pairs = monotone_matching(S)
        source = "T2 matching"
    else:
        pairs = [(int(i), int(j)) for i, j in layer_map]
        source = "given"
        for i, j in pairs:
            if not (0 <= i < L_B and 0 <= j < L_T):
                raise GraftError(
                    f"layer pair ({i}, {j}) is out of range: the base has {L_B} layers, the target {L_T}"
                )
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
            mp.reason = (
                f"the target ({target.arch.family}) has no {mp.canonical} module (it has {', '.join(have)})"
            )
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
    groups = _layer_groups(
        sorted(by_layer), lambda l: sum(module_bytes(i) for i in by_layer[l]), capture_bytes
    )
    t_capture = t_fit = 0.0
    fit_kw = dict(
        ridge_alpha=ridge_alpha,
        identity_tol=identity_tol,
        procrustes_tol=procrustes_tol,
        force=force,
        group=ra.group,
        seed=seed,
        fit_all=fit_all,
    )
    for g, layers in enumerate(groups):
        pg = progress.sub(0.25 + 0.75 * g / len(groups), 0.25 + 0.75 * (g + 1) / len(groups))
        idxs = [i for l in layers for i in by_layer[l]]
        bnames = [plans[i].name for i in idxs]
        tnames = list(dict.fromkeys(plans[i].target_name for i in idxs))  # type: ignore[misc]
        t1 = time.perf_counter()
        what = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
        if same_model:
            names = list(dict.fromkeys(bnames + tnames))  # type: ignore[operator]
            gb = capture(
                base,
                texts,
                modules=names,
                module_inputs=names,
                residual=False,
                batch_size=batch_size,
                progress=pg.sub(0, 0.6),
            )
            gt = gb
        else:
            gb = capture(
                base,
                texts,
                modules=bnames,
                module_inputs=bnames,
                residual=False,
                batch_size=batch_size,
                progress=pg.sub(0, 0.3),
            )
            gt = capture(
                target,
                texts,
                modules=tnames,
                module_inputs=tnames,
                residual=False,  # type: ignore[arg-type]
                batch_size=batch_size,
                progress=pg.sub(0.3, 0.6),
            )
        if gb.token_ids != cb.token_ids or gt.token_ids != ct.token_ids:
            raise GraftError(
                "internal: a module capture tokenised the texts differently from the residual capture"
            )
        t_capture += time.perf_counter() - t1
        t2 = time.perf_counter()
        rows: dict[tuple[str, int], torch.Tensor] = {}  # ("b"|"t", id(raw tensor)) -> aligned rows
        sides: dict[
            tuple[int, int], SideMap
        ] = {}  # (id(src raw), id(dst raw)) -> map; shared inputs fit once

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
            # dW_T = M_out^T dW_k M_in^T = (M_out^T B_k)(A_k M_in^T); identity sides keep the factors as
            # they are.
            B_T = Bk if m_out.kind == "identity" else (m_out.matrix.T @ Bk.double()).to(Bk.dtype)  # type: ignore[union-attr]
            A_T = Ak if m_in.kind == "identity" else (Ak.double() @ m_in.matrix.T).to(Ak.dtype)  # type: ignore[union-attr]
            mp.B, mp.A = B_T, A_T
            mp.input, mp.output = m_in, m_out
            mp.target_delta_norm = fro_factored(B_T, A_T)
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
        warnings.append(
            "no module could be conjugated: " + "; ".join(sorted({m.reason for m in plans}))[:300]
        )
    n_fit = int(fit.sum())
    chosen = [s for m in conj for s in (m.input, m.output) if s is not None]
    # An underdetermined rotation matters only where held-out rows leave the fit rows' span.
    under = [
        s
        for s in chosen
        if s.kind == "procrustes" and s.underdetermined and s.heldout_residual > identity_tol
    ]
    if under:
        widths = sorted({min(s.d_src, s.d_dst) for s in under})
        warnings.append(
            f"{len(under)} module side(s) use an underdetermined rotation: the fit rows ({n_fit}) do not "
            f"span width(s) {', '.join(map(str, widths))}, so it was completed off their span "
            "(engine.measure.linalg.procrustes_fit) and held-out rows show it — use a larger workload or "
            "--max-tokens"
        )
    thin = [s for s in chosen if s.kind == "ridge" and n_fit < s.d_src]
    if thin:
        widths = sorted({s.d_src for s in thin})
        warnings.append(
            f"{len(thin)} ridge side(s) are fitted on fewer rows ({n_fit}) than their input width(s) "
            f"({', '.join(map(str, widths))}): directions the rows do not reach are shrunk to zero — "
            "use a larger workload or --max-tokens"
        )
    poor = [s for s in chosen if s.heldout_residual > 0.5]
    if poor:
        warnings.append(
            f"{len(poor)} side map(s) leave more than half of the held-out energy unexplained "
            "(held-out residual > 0.5): the update may not carry over there"
        )
    return ConjugationPlan(
        base_label=base.label,
        target_label=target.label,
        modules=plans,
        layer_map=sorted(lmap.items()),
        layer_map_source=source,
        alignment={**ra.summary(), "n_fit": int(fit.sum()), "n_heldout": int(held.sum())},
        params={
            "k": k,
            "energy": energy or None,
            "ridge_alpha": ridge_alpha,
            "heldout_fraction": heldout_fraction,
            "seed": seed,
            "outlier_factor": outlier_factor,
            "identity_tol": identity_tol,
            "procrustes_tol": procrustes_tol,
            "map": force,
        },
        warnings=warnings,
        seconds={
            "match": t_match,
            "module_capture": t_capture,
            "fit": t_fit,
            "total": time.perf_counter() - t_start,
        },
    )
