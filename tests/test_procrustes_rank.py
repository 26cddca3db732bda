"""T3 when the fit rows do not span the width: the orthogonal map must be unique, the held-out
residual must not depend on SVD internals, and the result must say the fit is underdetermined.

Ground truth used here: a layer compared with itself (the truth is R = I, held-out residual 0 at
any number of rows), planted rotations / semi-orthogonal maps, and held-out rows built inside the
fit rows' span (which any exact minimiser must map exactly).
"""

import dataclasses
import json
import math

import pytest
import torch

from engine.loading.models import ModelSpec
from engine.measure.linalg import (
    COMPLETION_IDENTITY,
    COMPLETION_SPAN,
    COMPLETION_UNIQUE,
    Standardiser,
    procrustes_fit,
    procrustes_map,
    random_orthogonal,
    residual,
    split_rows,
)
from engine.measure.subspace import COMPLETION_NONE
from engine.running.runner import run_tool

D = 64  # width of the tiny built-in models (engine/loading/tiny.py)
ROW_COUNTS = (16, 40, 63, 64, 200)


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    """Anisotropic rows with an offset, like a residual stream (distinct variances per direction)."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, d, dtype=torch.float64)
        + 0.7
    )


def _t3_split(X: torch.Tensor, Y: torch.Tensor, n_fit: int, n_held: int = 40):
    """The T3 pipeline on one layer pair: split_rows (one text per row here), then Standardiser
    statistics from the fit rows applied unchanged to the held-out rows."""
    n = n_fit + n_held
    fit, held = split_rows(torch.arange(n), n_held / n, seed=0)
    assert int(fit.sum()) == n_fit and int(held.sum()) == n_held
    sx, sy = Standardiser.fit(X[fit]), Standardiser.fit(Y[fit])
    return sx(X[fit]), sx(X[held]), sy(Y[fit]), sy(Y[held])


def _old_procrustes_map(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """What T3 did before: U V^T of the thin SVD, whatever null-space bases the SVD returns."""
    U, _, Vh = torch.linalg.svd(X.T @ Y, full_matrices=False)
    return U @ Vh


def _other_exact_minimiser(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Another orthogonal R with exactly the same fit residual: the same U_r V_r^T, and minus the
    chosen completion between the null spaces (the freedom the fit rows leave; with a 1-dim null
    space this is the only other choice)."""
    U, S, Vh = torch.linalg.svd(X.T @ Y)
    r = int((S > 1e-10 * S[0]).sum())
    P = U[:, :r] @ Vh[:r]
    return P - (procrustes_fit(X, Y).R - P)


# --- (a) identical layers: held-out residual ~0 at any workload size --------------------------
@pytest.mark.parametrize("n_fit", ROW_COUNTS)
def test_identical_layers_have_zero_heldout_residual_at_any_row_count(n_fit):
    X = _rows(n_fit + 40, D, seed=n_fit)
    Y = X.clone()  # target layer identical to the donor's
    Xf, Xh, Yf, Yh = _t3_split(X, Y, n_fit)
    fit = procrustes_fit(Xf, Yf)
    assert fit.rank == min(n_fit - 1, D)  # centring costs one row
    assert fit.underdetermined is (n_fit - 1 < D)
    assert fit.completion == (COMPLETION_IDENTITY if n_fit - 1 < D else COMPLETION_UNIQUE)
    assert residual(Xh @ fit.R, Yh) < 1e-6
    assert residual(Xf @ fit.R, Yf) < 1e-6
    assert torch.allclose(fit.R, torch.eye(D, dtype=torch.float64), atol=1e-8)  # the truth is R = I
    assert torch.allclose(procrustes_map(Xf, Yf), fit.R)  # the plain map is the same, for other callers
    if fit.underdetermined:
        # The number is not right by accident: another exact minimiser fits the rows equally well
        # and gets the held-out rows badly wrong (the 0.019-0.11).
        other = _other_exact_minimiser(Xf, Yf)
        assert torch.allclose(other.T @ other, torch.eye(D, dtype=torch.float64), atol=1e-10)
        assert residual(Xf @ other, Yf) == pytest.approx(residual(Xf @ fit.R, Yf), abs=1e-10)
        assert residual(Xh @ other, Yh) > 1e-2


def test_tool_on_a_model_against_itself_with_fewer_rows_than_width(workload, one_thread):
    env = run_tool(
        "procrustes",
        ModelSpec.parse("tiny-gpt2-a"),
        ModelSpec.parse("tiny-gpt2-a"),
        {"workload": workload, "max_tokens": 40},
    )
    json.dumps(env, allow_nan=False)
    r = env["result"]
    assert r["donor_width"] == r["target_width"] == D
    assert r["n_fit"] < D  # the case of the issue: fit rows do not span the width
    assert r["rows_per_width"] == pytest.approx(r["n_fit"] / D, abs=1e-6)
    assert r["completion"] == COMPLETION_NONE  # the whole-space completion is skipped: subspace only
    for layer in r["layers"]:
        assert layer["donor_layer"] == layer["target_layer"]
        assert layer["residual_heldout"] == pytest.approx(0.0, abs=1e-6)
        assert layer["residual_fit"] == pytest.approx(0.0, abs=1e-6)
        assert layer["underdetermined"] is True and layer["rank"] < D
        assert isinstance(layer["rank"], int) and layer["rank"] <= r["n_fit"] - 1
    assert r["mean_alignment"] == pytest.approx(1.0, abs=1e-6)
    (w,) = r["warnings"]
    assert w.startswith(
        f"T3 fit is underdetermined in {len(r['layers'])}/{len(r['layers'])} layers: {r['n_fit']} fit rows"
    )
    assert "principal directions" in w and "--max-tokens" in w and "\n" not in w
    assert r["estimator"] == "principal subspace" and r["tokens_needed"] > r["n_fit"]
    for layer in r["layers"]:
        assert layer["estimator"] == "principal subspace" and layer["residual_heldout_completed"] is None
        assert 0 < layer["heldout_energy_in_subspace"] <= 1

    # ample rows: the same pair is fully determined, still exact, and nothing to warn about
    r = run_tool(
        "procrustes", ModelSpec.parse("tiny-gpt2-a"), ModelSpec.parse("tiny-gpt2-a"), {"workload": workload}
    )["result"]
    assert r["n_fit"] > D and r["completion"] == COMPLETION_UNIQUE and r["warnings"] == []
    assert all(
        l["rank"] == D and l["underdetermined"] is False and l["residual_heldout"] < 1e-6 for l in r["layers"]
    )


# --- (b) planted rotation, ample rows ---------------------------------------------------------
def test_planted_rotation_with_ample_rows_is_unique_and_recovered():
    d = 16
    X = _rows(500, d, seed=1)
    R0 = random_orthogonal(d, seed=7)
    Xf, Xh, Yf, Yh = _t3_split(X, X @ R0 + 0.3, 400, 100)
    fit = procrustes_fit(Xf, Yf)
    assert (fit.rank, fit.underdetermined, fit.completion) == (d, False, COMPLETION_UNIQUE)
    assert torch.allclose(fit.R, R0, atol=1e-8)
    assert residual(Xh @ fit.R, Yh) < 1e-12


def test_tool_on_a_planted_rotation_with_ample_rows_reports_no_warning(planted_rotation_t3):
    res, d = planted_rotation_t3
    assert res.warnings == [] and res.completion == COMPLETION_UNIQUE
    assert res.rows_per_width == pytest.approx(res.n_fit / d)
    for layer in res.layers:
        assert layer["rank"] == d and layer["underdetermined"] is False
        assert layer["residual_heldout"] < 1e-6


# --- (c) planted rotation, fewer rows than width ----------------------------------------------
def test_planted_rotation_with_few_rows_maps_the_fit_span_exactly():
    n_fit = 20
    g = torch.Generator().manual_seed(3)
    R0 = random_orthogonal(D, seed=11)
    Xf = _rows(n_fit, D, seed=3)
    Yf = Xf @ R0
    fit = procrustes_fit(Xf, Yf)
    assert fit.rank == n_fit and fit.underdetermined and fit.completion == COMPLETION_IDENTITY
    assert torch.allclose(fit.R.T @ fit.R, torch.eye(D, dtype=torch.float64), atol=1e-10)  # a rotation
    assert residual(Xf @ fit.R, Yf) < 1e-20
    # held-out rows inside the span of the fit rows are determined by them: mapped exactly
    Xin = torch.randn(30, n_fit, generator=g, dtype=torch.float64) @ Xf
    assert residual(Xin @ fit.R, Xin @ R0) < 1e-20
    # rows off that span are not (the data cannot tell): R is not R0 there
    Xout = _rows(30, D, seed=4)
    assert residual(Xout @ fit.R, Xout @ R0) > 0.1


# --- (d) unequal widths -----------------------------------------------------------------------
@pytest.mark.parametrize("dx,dy", [(48, 64), (64, 48)])
def test_unequal_widths_fit_within_the_span(dx, dy):
    Q = random_orthogonal(max(dx, dy), seed=5)
    R0 = Q[:dx] if dx < dy else Q[:, :dy]  # semi-orthogonal planted map (dx, dy)
    n_fit = 30  # fewer than either width
    X = _rows(n_fit + 40, dx, seed=6)
    Xf, Xh, Yf, Yh = _t3_split(X, X @ R0, n_fit)
    fit = procrustes_fit(Xf, Yf)
    assert fit.R.shape == (dx, dy) and torch.isfinite(fit.R).all()
    assert fit.rank == n_fit - 1 and fit.underdetermined and fit.completion == COMPLETION_SPAN
    R = fit.R
    assert torch.allclose(R @ R.T @ R, R, atol=1e-10)  # a partial isometry: no direction is stretched
    rh = residual(Xh @ R, Yh)
    assert math.isfinite(rh) and math.isfinite(residual(Xf @ R, Yf))
    if dx < dy:
        assert residual(Xf @ R, Yf) < 1e-20
        # Y keeps X's norm, so predicting the in-span part and 0 elsewhere explains a share of it
        assert 0.0 <= rh <= 1.0 + 1e-9
        inside = torch.randn(10, n_fit, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) @ Xf
        assert residual(inside @ R, inside @ R0) < 1e-20


def test_tool_with_unequal_widths_and_few_rows_is_finite_and_warns():
    from engine.core.progress import silent
    from engine.measure.align import Aligned
    from engine.measure.cka import cka_matrix
    from engine.tools.procrustes import ProcrustesParams, compute_procrustes

    g = torch.Generator().manual_seed(8)
    L, n, dx, dy = 2, 40, 48, 64
    X = torch.randn(L + 1, n, dx, generator=g)
    Y = X @ random_orthogonal(dy, seed=9)[:dx].float()

    class Ctx:
        def aligned(self, progress):
            return Aligned(X, Y, torch.arange(n) // 4, "token")

        def cka(self, progress, include_embeddings):
            return cka_matrix(X[1:], Y[1:])

    res = dataclasses.asdict(compute_procrustes(Ctx(), ProcrustesParams(), silent()))
    json.dumps(res, allow_nan=False)
    n_fit = res["n_fit"]
    assert n_fit < dx and res["rows_per_width"] == pytest.approx(n_fit / dy)
    assert res["completion"] == COMPLETION_NONE and res["estimator"] == "principal subspace"
    (w,) = res["warnings"]
    assert w.startswith(
        f"T3 fit is underdetermined in {L}/{L} layers: {n_fit} fit rows against widths 48 → 64 "
        f"(rank {n_fit - 1} of 48)"
    )
    for layer in res["layers"]:
        assert layer["underdetermined"] is True and layer["rank"] == n_fit - 1
        assert layer["residual_identity"] is None
        # Y is X in other coordinates of a wider space: measured where the rows define it, exact
        assert 0.0 <= layer["residual_heldout"] < 1e-4


def test_unequal_widths_with_rows_between_the_widths_are_unique_but_warned():
    """Rows span the narrow side but not the wide one (the SmolLM2 -> Gemma case of the issue):
    the map is unique, yet fitted on fewer rows than the wide width, which the result says."""
    from engine.tools.procrustes import procrustes_warnings

    layers = [{"rank": 48, "underdetermined": False}]
    (w,) = procrustes_warnings(layers, 60, 48, 64)
    assert "fewer than the larger width" in w and "unique" in w
    assert procrustes_warnings(layers, 64, 48, 64) == []


# --- (e) the completion does not depend on the SVD's choice of bases --------------------------
def test_completion_is_equivariant_to_a_change_of_basis():
    """Rotating both spaces by the same Q changes nothing real: the map must become Q^T R Q and
    the held-out residual must stay the same. The old U V^T completion depended on whatever
    null-space bases the SVD returned, so it failed this (checked below on the same data)."""
    n_fit = 16
    X = _rows(n_fit + 40, D, seed=12)
    Y = X @ random_orthogonal(D, seed=13) + 0.05 * _rows(n_fit + 40, D, seed=14)  # related, not identical
    Xf, Xh, Yf, Yh = _t3_split(X, Y, n_fit)
    Q = random_orthogonal(D, seed=15)
    R = procrustes_fit(Xf, Yf).R
    Rq = procrustes_fit(Xf @ Q, Yf @ Q).R
    assert torch.allclose(Rq, Q.T @ R @ Q, atol=1e-8)
    assert residual(Xh @ Q @ Rq, Yh @ Q) == pytest.approx(residual(Xh @ R, Yh), abs=1e-10)
    # X^T Y does not see row order
    perm = torch.randperm(n_fit, generator=torch.Generator().manual_seed(0))
    Rp = procrustes_fit(Xf[perm], Yf[perm]).R
    assert torch.allclose(Rp, R, atol=1e-10)

    # the same checks on the old completion fail: its held-out number is an SVD artefact
    old, old_q = _old_procrustes_map(Xf, Yf), _old_procrustes_map(Xf @ Q, Yf @ Q)
    assert not torch.allclose(old_q, Q.T @ old @ Q, atol=1e-3)
    Xi = X[: n_fit + 40].clone()
    Xf_i, Xh_i, _, _ = _t3_split(Xi, Xi, n_fit)
    assert residual(Xh_i @ _old_procrustes_map(Xf_i, Xf_i), Xh_i) > 1e-3  # identical layers, nonzero residual


def test_null_space_completion_ignores_duplicated_rows():
    """Duplicating fit rows reweights the in-span fit but leaves the span, hence the null spaces,
    unchanged: for identical layers the map stays exactly I (any completion picked from SVD bases
    of a different matrix would move)."""
    n_fit = 24
    X = _rows(n_fit + 40, D, seed=16)
    Xf, Xh, _, _ = _t3_split(X, X, n_fit)
    dup = torch.cat([Xf, Xf[:5], Xf[:5]])
    R = procrustes_fit(dup, dup).R
    assert torch.allclose(R, torch.eye(D, dtype=torch.float64), atol=1e-8)
    assert residual(Xh @ R, Xh) < 1e-12


def test_rank_tolerance_and_degenerate_inputs():
    # all-zero rows: rank 0, still a well-defined rotation (the identity) and finite numbers
    Z = torch.zeros(5, 8, dtype=torch.float64)
    fit = procrustes_fit(Z, Z)
    assert fit.rank == 0 and fit.completion == COMPLETION_IDENTITY
    assert torch.allclose(fit.R, torch.eye(8, dtype=torch.float64))
    fit = procrustes_fit(torch.zeros(5, 6, dtype=torch.float64), torch.zeros(5, 8, dtype=torch.float64))
    assert fit.rank == 0 and fit.completion == COMPLETION_SPAN and torch.isfinite(fit.R).all()
    # float32 inputs: computed in float64, returned in float32, round-off not counted as rank
    X = _rows(20, 32, seed=17).float()
    Xc = X - X.mean(0, keepdim=True)
    fit = procrustes_fit(Xc, Xc)
    assert fit.R.dtype == torch.float32 and fit.rank == 19
    assert torch.allclose(fit.R, torch.eye(32), atol=1e-5)


def test_twin_in_other_coordinates_with_few_rows_scores_as_aligned():
    """Y = X Q with Q a planted rotation and fewer fit rows than the width: the two compute the same
    thing, so the headline held-out residual must be ~0. The full-space completion cannot know Q off
    the fit rows' span and scores far from 0 (the -0.245 'alignment' at 1B); the principal-subspace
    estimate is exact, and an unrelated pair is not."""
    from engine.measure.subspace import subspace_fit

    d = 48
    X = _rows(70, d, seed=4)
    Q = random_orthogonal(d, seed=11)
    Xf, Xh, Yf, Yh = _t3_split(X, X @ Q, 30, 40)
    assert procrustes_fit(Xf, Yf).underdetermined
    completed = residual(Xh @ procrustes_fit(Xf, Yf).R, Yh)
    assert completed > 0.2
    sub = subspace_fit(Xf, Yf, Xh, Yh)
    assert sub.rank == 14 and sub.residual_heldout < 1e-8 and 0 < sub.energy < 1
    Z = _rows(70, d, seed=5)
    _, Zh_x, Zf, Zh = _t3_split(X, Z, 30, 40)
    assert subspace_fit(Xf, Zf, Xh, Zh).residual_heldout > 0.5
