"""T3's GPU route (engine.measure.polar): batched Newton polar factors against planted factors and the SVD
route, the certificate that sends rank-deficient and ill-conditioned layers to the SVD, and the
whole tool through that route equal to the CPU route (it runs here on the CPU; CUDA picks it)."""

import pytest
import torch

from engine.core.progress import silent
from engine.measure.align import Aligned
from engine.measure.cka import cka_matrix
from engine.measure.linalg import (
    COMPLETION_IDENTITY,
    COMPLETION_SPAN,
    COMPLETION_UNIQUE,
    procrustes_from_cross,
    random_orthogonal,
)
from engine.measure.polar import cross_fits, polar_newton
from engine.tools import procrustes as t3


def _planted(d: int, cond: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """M = Q H with Q orthogonal and H symmetric positive definite of condition ``cond``: Q is M's
    polar factor by construction (no SVD involved)."""
    Q, V = random_orthogonal(d, seed), random_orthogonal(d, seed + 100)
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)
    return Q @ (V * s) @ V.T, Q


@pytest.mark.parametrize("cond", [1.0, 1e3, 1e6, 1e8])
def test_newton_recovers_a_planted_polar_factor(cond):
    Ms, Qs = zip(*[_planted(40, cond, seed) for seed in range(3)])
    R, ok = polar_newton(torch.stack(Ms))
    assert ok.all()
    for k in range(3):
        assert float((R[k] - Qs[k]).abs().max()) < 1e-15 * cond * 40 + 1e-12
        assert float((R[k].T @ R[k] - torch.eye(40, dtype=torch.float64)).abs().max()) < 1e-12


@pytest.mark.parametrize("shape", [(40, 40), (48, 32), (32, 48)])
def test_newton_equals_the_svd_route(shape):
    g = torch.Generator().manual_seed(1)
    Ms = [
        torch.randn(*shape, generator=g, dtype=torch.float64)
        * torch.logspace(0, -4, shape[1], dtype=torch.float64)
        for _ in range(4)
    ]
    fits = cross_fits(Ms, newton=True)
    for M, f in zip(Ms, fits):
        ref = procrustes_from_cross(M)
        assert ref.completion == COMPLETION_UNIQUE and f.completion == COMPLETION_UNIQUE
        assert f.rank == ref.rank == min(shape)
        assert float((f.R - ref.R).abs().max()) < 1e-9
        assert f.cross == pytest.approx(ref.cross, rel=1e-12)


def test_uncertified_layers_take_the_svd_route_with_its_completion():
    """Rank-deficient M (a layer against itself with few rows, as T3 meets) and a condition number
    beyond the certificate go to the SVD: rank below full, completed closest to identity, or
    within the span for unequal widths; certified layers in the same batch stay on Newton."""
    good, _ = _planted(30, 1e2, 0)
    X = torch.randn(10, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    deficient = X.T @ X  # rank 10 of 30
    huge, _ = _planted(30, 1e12, 1)  # full rank, but kappa above 1e9
    R, ok = polar_newton(torch.stack([good, deficient, huge]))
    assert ok.tolist() == [True, False, False]
    fits = cross_fits([good, deficient, huge], newton=True)
    for M, f in zip([good, deficient, huge], fits):
        ref = procrustes_from_cross(M)
        assert (f.rank, f.completion) == (ref.rank, ref.completion)
        assert torch.allclose(f.R, ref.R, atol=1e-9)
    assert fits[1].completion == COMPLETION_IDENTITY and fits[1].rank == 10
    assert torch.allclose(fits[1].R, torch.eye(30, dtype=torch.float64), atol=1e-9)  # X against itself: I
    wide = torch.cat([deficient, torch.zeros(30, 6, dtype=torch.float64)], 1)
    (f,) = cross_fits([wide], newton=True)
    assert f.completion == COMPLETION_SPAN and f.rank == 10


def test_polar_newton_rejects_what_it_cannot_take():
    with pytest.raises(ValueError):
        polar_newton(torch.eye(3))
    R, ok = polar_newton(torch.zeros(2, 5, 5, dtype=torch.float64))
    assert not ok.any()


@pytest.mark.parametrize("dy", [12, 16])
def test_t3_through_the_newton_route_equals_the_cpu_route(monkeypatch, dy):
    """The tool end to end: the batched route CUDA takes (forced here on the CPU) gives the same
    layers as the per-layer SVD route, for a planted rotation plus noise (equal widths) and for
    unequal widths, and a model against itself stays exact."""
    g = torch.Generator().manual_seed(7)
    L, n, d = 3, 300, 12
    X = torch.randn(L + 1, n, d, generator=g) * torch.linspace(0.1, 2.0, d)
    noise = 0.05 * torch.randn(L + 1, n, dy, generator=g)
    Y = (X @ random_orthogonal(d, seed=5).float() if dy == d else X @ torch.randn(d, dy, generator=g)) + noise

    class Ctx:
        def __init__(self, A, B):
            self.A, self.B = A, B

        def aligned(self, progress):
            return Aligned(self.A, self.B, torch.arange(n) // 10, "token")

        def cka(self, progress, include_embeddings):
            return cka_matrix(self.A[1:], self.B[1:])

    def run(A, B, newton):
        monkeypatch.setattr(t3, "use_newton", lambda dev: newton)
        return t3.compute_procrustes(Ctx(A, B), t3.ProcrustesParams(), silent())

    for A, B in ((X, Y), (X, X)):
        cpu, gpu_route = run(A, B, False), run(A, B, True)
        assert gpu_route.completion == cpu.completion == COMPLETION_UNIQUE
        for a, b in zip(cpu.layers, gpu_route.layers):
            assert a.keys() == b.keys()
            for k in a:
                assert b[k] == pytest.approx(a[k], abs=2e-6), k
    assert all(l["residual_heldout"] < 1e-6 for l in run(X, X, True).layers)
