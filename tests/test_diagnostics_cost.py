"""The faster paths of T1-T4 (bench/alignment.py) against their definitions.

Each path is checked against the quantity computed the plain way: T3's dual (n x n) ridge in the
underdetermined case against the primal ridge solved directly, T3's fit residual of R from the
singular values against ||X R - Y||^2, CKA's chunked Gram inner products against float64 CKA,
and the memoised workload budget and vocabulary against fresh ones.
"""

import pytest
import torch

from engine.core.progress import silent
from engine.measure.cka import _gram_products, cka
from engine.measure.linalg import RidgeFactor, Standardiser, procrustes_fit, residual
from engine.measure.procrustes_pair import fit_pair
from engine.measure.subspace import subspace_fit


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, d, dtype=torch.float64)
        + 0.5
    )


@pytest.mark.parametrize("n_fit, dx, dy", [(20, 48, 48), (20, 48, 32), (100, 48, 48), (100, 40, 56)])
def test_t3_fit_pair_equals_the_direct_fits(n_fit, dx, dy):
    """Every residual fit_pair reports equals the one computed from R and the primal ridge map W
    directly, with fewer fit rows than the widths (dual ridge, thin Procrustes) and with more."""
    n_held = 15
    X = _rows(n_fit + n_held, dx, 1)
    rot = torch.linalg.qr(
        torch.randn(dy, dy, dtype=torch.float64, generator=torch.Generator().manual_seed(7 * dy))
    )[0]
    Y = X[:, :dy] @ rot if dy <= dx else _rows(n_fit + n_held, dy, 2)
    Y = Y + 0.3 * _rows(n_fit + n_held, dy, 3)
    fit = torch.zeros(n_fit + n_held, dtype=torch.bool)
    fit[:n_fit] = True
    alpha = 0.01
    got = fit_pair(X.float(), Y.float(), fit, ~fit, alpha, 0, 0)

    sx, sy = Standardiser.fit(X[fit].float().double()), Standardiser.fit(Y[fit].float().double())
    Xf, Xh = sx(X[fit].float().double()), sx(X[~fit].float().double())
    Yf, Yh = sy(Y[fit].float().double()), sy(Y[~fit].float().double())
    R = procrustes_fit(Xf, Yf).R
    W = RidgeFactor.of(Xf.T @ Xf, alpha).solve(Xf.T @ Yf)
    if got.underdetermined:  # the headline is the principal-subspace estimate; the completion is kept
        sub = subspace_fit(Xf, Yf, Xh, Yh)
        assert got.estimator == "principal subspace" and got.subspace_rank == sub.rank
        assert got.residual_fit == pytest.approx(sub.residual_fit, abs=2e-6)
        assert got.residual_heldout == pytest.approx(sub.residual_heldout, abs=2e-6)
        # fewer fit rows than the widths: the whole-space completion is not computed at all
        assert got.residual_heldout_completed is None and got.rank == n_fit - 1
    else:
        assert got.estimator == "full" and got.residual_heldout_completed is None
        assert got.residual_fit == pytest.approx(residual(Xf @ R, Yf), abs=2e-6)
        assert got.residual_heldout == pytest.approx(residual(Xh @ R, Yh), abs=2e-6)
    assert got.residual_ridge_fit == pytest.approx(residual(Xf @ W, Yf), abs=2e-6)
    assert got.residual_ridge == pytest.approx(residual(Xh @ W, Yh), abs=2e-6)


def test_cka_gram_blocks_with_many_entries_match_float64_cka():
    """Blocks larger than one 4,096-entry chunk: the float32 chunks summed in float64 give CKA to
    1e-6, and a layer against itself gives exactly the diagonal of 1 (to 1e-7)."""
    g = torch.Generator().manual_seed(4)
    Xs = torch.randn(2, 150, 12, generator=g)
    Ys = torch.stack([Xs[1] @ torch.randn(12, 12, generator=g), torch.randn(150, 12, generator=g)])
    Xc, Yc = Xs - Xs.mean(1, keepdim=True), Ys - Ys.mean(1, keepdim=True)
    num, nx, ny = _gram_products(Xc, Yc, block=100, progress=silent())  # blocks of 100 x 100 and 100 x 50
    M = num / (nx.sqrt().unsqueeze(1) * ny.sqrt().unsqueeze(0))
    for i in range(2):
        for j in range(2):
            assert float(M[i, j]) == pytest.approx(cka(Xs[i], Ys[j]), abs=1e-6)
    num, nx, _ = _gram_products(Xc, Xc, block=100, progress=silent())
    assert torch.allclose(num.diagonal() / nx, torch.ones(2, dtype=torch.float64), atol=1e-7)


def test_workload_budget_is_memoised_per_tokenizer_and_matches_a_fresh_budget(monkeypatch):
    import engine.measure.capture_cache as capture
    from engine.loading.tiny import build_tiny

    tok_a, tok_b = build_tiny("tiny-gpt2-a")[1], build_tiny("tiny-gpt2-a")[1]
    texts = ["the cat sat on the mat " * 30, "a short one", "and another text here"]
    cache = capture.CaptureCache()
    cut: list = []
    want = capture.budget_texts(texts, [tok_a], 60, per_text=40, cut_log=cut)
    calls = []
    real = capture.budget_texts
    monkeypatch.setattr(capture, "budget_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert cache.budget(texts, [tok_a], 60, 40) == (want, cut) and cut  # the first text was cut to 40 tokens
    assert cache.budget(texts, [tok_a], 60, 40) == (want, cut)
    assert len(calls) == 1  # memoised: not tokenised again
    assert cache.budget(texts, [tok_b], 60, 40)[0] == want and len(calls) == 2  # another tokenizer object
    assert cache.budget(texts, [tok_a], 30, 40)[0] != want and len(calls) == 3  # another budget


def test_vocabulary_memo_follows_added_tokens():
    from engine.loading.tiny import build_tiny
    from engine.loading.tokens import same_tokenizer, tokenizer_vocab

    a, b = build_tiny("tiny-gpt2-a")[1], build_tiny("tiny-gpt2-a")[1]
    assert same_tokenizer(a, b)
    assert tokenizer_vocab(a) is tokenizer_vocab(a)
    a.add_tokens(["<graft-new-token>"])
    assert "<graft-new-token>" in tokenizer_vocab(a)
    assert not same_tokenizer(a, b)


def test_cka_inner_products_on_cuda_are_float64_and_a_layer_against_itself_is_exactly_one():
    """CUDA's form of CKA's Gram inner products (forced here on the CPU): float64 products, equal to
    float64 CKA and to the CPU's float32 chunks within their rounding, and a Gram block against
    itself has <K, K> equal to ||K||^2 to float64 round-off (the CPU's chunks: about 1e-7)."""
    import engine.measure.cka as cka_mod

    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(3, 3 * 4096 + 100, generator=g), torch.randn(4, 3 * 4096 + 100, generator=g)
    exact = A.double() @ B.double().T
    bound = 1e-6 * (A.double().abs() @ B.double().abs().T)  # float32 round-off of sums of products
    cpu, wide = cka_mod._dots(A, B), cka_mod._dots(A, B, wide=True)
    assert torch.allclose(wide, exact, rtol=1e-12, atol=1e-9) and ((cpu - exact).abs() <= bound).all()
    assert not torch.equal(cpu, wide)  # the two forms do differ
    self_dots, norms = cka_mod._dots(A, A, wide=True).diagonal(), cka_mod._sq_norms(A, wide=True)
    assert torch.allclose(self_dots / norms, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-14)
    assert torch.allclose(cka_mod._sq_norms(A), norms, rtol=1e-6)


def test_t1_jaccard_counts_from_the_smaller_side_as_the_set_formula():
    """T1's Jaccard without building the union and intersection sets equals |a & b| / |a | b|,
    on dict key views (the whole vocabulary) and sets (a sample), empty ones included."""
    import random

    from engine.tools.compat import jaccard

    rng = random.Random(0)
    for _ in range(50):
        a = {f"t{rng.randrange(400)}": i for i in range(rng.randrange(0, 300))}
        b = {f"t{rng.randrange(400)}" for _ in range(rng.randrange(0, 300))}
        want = len(a.keys() & b) / max(len(a.keys() | b), 1)
        assert jaccard(a.keys(), b) == pytest.approx(want, abs=1e-15)
        assert jaccard(b, a.keys()) == pytest.approx(want, abs=1e-15)
    assert jaccard(set(), set()) == 0.0 and jaccard({"x"}, {"x"}) == 1.0
