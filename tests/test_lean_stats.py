"""The lean route of T2 and T3 (engine/running/lean_stats.py, ``--stats streamed``): no layer's rows
outlive its block. Checked against the rows route (the same T3 per pair, to 1e-4), against the
definition (one minibatch = debiased CKA), and against planted truth (a rotated twin, a model
against itself), with the memory plan's choice and a cancel mid-walk."""

from __future__ import annotations

import json

import pytest
import torch

from engine.core.errors import Cancelled, GraftError
from engine.core.progress import Progress
from engine.loading.models import ModelSpec, load_model
from engine.loading.tiny import build_tiny
from engine.measure.cka import DEBIASED, cka_matrix, minibatch_cka, minibatch_grams, minibatch_parts
from engine.running.memplan import plan_run
from engine.running.runner import run_tool
from engine.surgery.twin import rotate_model
from tests.test_streaming import save_tiny


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = save_tiny(tmp_path_factory, ("tiny-llama-a", "tiny-llama-b", "tiny-gpt2-a"))
    model, tok = build_tiny("tiny-llama-a")
    twin, _ = rotate_model(model, seed=3)
    d = tmp_path_factory.mktemp("twin")
    twin.save_pretrained(d)
    tok.save_pretrained(d)
    out["twin"] = str(d)
    return out


def _grams(Z: torch.Tensor, parts):
    out = [torch.empty(Z.shape[0], len(p), len(p)) for p in parts]
    for l in range(Z.shape[0]):
        minibatch_grams(Z[l], parts, out, l)
    return out


def test_one_minibatch_is_debiased_cka_and_a_shift_changes_nothing():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 300, 40, generator=g)
    Y = torch.randn(2, 300, 24, generator=g)
    Y[0] = X[1][:, :24] * 3.0 + 0.1 * torch.randn(300, 24, generator=g)
    exact = cka_matrix(X, Y, estimator=DEBIASED)
    one = minibatch_parts(300, rows=300)
    keep = [torch.ones(len(p), dtype=torch.bool) for p in one]
    assert len(one) == 1
    mb = minibatch_cka(_grams(X, one), _grams(Y, one), keep)
    assert torch.allclose(mb, exact, atol=1e-6)
    shifted = minibatch_cka(_grams(X + 50.0, one), _grams(Y - 7.0, one), keep)
    assert torch.allclose(shifted, exact, atol=1e-5)
    # many minibatches: the planted pair stands out, unrelated layers stay near 0
    many = minibatch_parts(300, rows=64)
    assert len(many) == 5 and sorted(torch.cat(many).tolist()) == list(range(300))
    M = minibatch_cka(_grams(X, many), _grams(Y, many), [torch.ones(len(p), dtype=torch.bool) for p in many])
    assert abs(M[1, 0] - exact[1, 0]) < 0.05 and M[1, 0] > 0.6
    assert M.abs().flatten()[[0, 1, 3, 4, 5]].max() < 0.15


def test_dropped_rows_leave_their_gram_rows_and_columns():
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(2, 80, 16, generator=g), torch.randn(2, 80, 12, generator=g)
    parts = minibatch_parts(80, rows=80)
    keep = torch.ones(80, dtype=torch.bool)
    keep[[3, 17, 40]] = False
    kp = [keep.index_select(0, p) for p in parts]
    at = parts[0][kp[0]]  # the kept rows, in the minibatch's order
    want = cka_matrix(X[:, at], Y[:, at], estimator=DEBIASED)
    assert torch.allclose(minibatch_cka(_grams(X, parts), _grams(Y, parts), kp), want, atol=1e-6)
    with pytest.raises(GraftError, match="minibatch"):
        minibatch_cka(_grams(X, parts), _grams(Y, parts), [torch.zeros(80, dtype=torch.bool)])


def _run(tool, d, t, workload, stats, **params):
    opts = {"workload": workload, "stream": "on", "device": "cpu", "stats": stats}
    env = run_tool(tool, ModelSpec.parse(d), ModelSpec.parse(t), opts, params or None)
    json.dumps(env, allow_nan=False)
    return env


@pytest.mark.parametrize("pair", [("tiny-llama-a", "tiny-llama-b"), ("tiny-gpt2-a", "tiny-llama-b")])
def test_t3_lean_equals_the_rows_route(folders, workload, pair, one_thread):
    d, t = folders[pair[0]], folders[pair[1]]
    rows = _run("procrustes", d, t, workload, "rows", pairs="depth")
    lean = _run("procrustes", d, t, workload, "streamed", pairs="depth")
    assert lean["meta"]["stats"] == "streamed" and "stats" not in rows["meta"]
    assert lean["meta"]["memory_plan"]["stats"] == "streamed"
    a, b = rows["result"], lean["result"]
    assert a["alignment"] == b["alignment"] == ("token" if pair[0] == "tiny-llama-a" else "word")
    assert (a["n_fit"], a["n_heldout"]) == (b["n_fit"], b["n_heldout"])
    for la, lb in zip(a["layers"], b["layers"]):
        assert (la["donor_layer"], la["target_layer"]) == (lb["donor_layer"], lb["target_layer"])
        for k in ("residual_fit", "residual_heldout", "residual_ridge", "alignment"):
            assert la[k] == pytest.approx(lb[k], abs=1e-4), k
    assert rows["meta"]["n_outlier_rows"] == lean["meta"]["n_outlier_rows"]


def test_t2_lean_reports_minibatch_and_matches_the_debiased_rows(folders, workload, one_thread):
    d, t = folders["tiny-llama-a"], folders["tiny-llama-b"]
    lean = _run("cka", d, t, workload, "streamed")["result"]
    assert (lean["estimator"], lean["form"]) == ("debiased", "minibatch")
    # the workload is under one minibatch: the same numbers as debiased CKA of the captured rows
    from engine.measure.align import align, drop_outliers
    from engine.measure.capture_cache import capture_model

    a = load_model(ModelSpec.parse(d), "cpu", "float32")
    b = load_model(ModelSpec.parse(t), "cpu", "float32")
    from engine.core.data import load_workload

    texts = list(dict.fromkeys(load_workload(workload).texts))
    al = drop_outliers(align(capture_model(a, texts), capture_model(b, texts)), 20.0)
    assert al.n == lean["n_rows"] <= 512
    want = cka_matrix(al.X[1:], al.Y[1:], estimator=DEBIASED)
    assert torch.allclose(torch.tensor(lean["matrix"], dtype=torch.float64), want, atol=1e-5)


def test_lean_route_recovers_a_planted_rotation_and_a_model_against_itself(folders, workload, one_thread):
    a, twin = folders["tiny-llama-a"], folders["twin"]
    res = _run("procrustes", a, twin, workload, "streamed")["result"]
    assert res["rows_per_width"] > 1  # determined: the rotation is the only map that fits
    assert res["pairs"] == "matching"
    assert [(l["donor_layer"], l["target_layer"]) for l in res["layers"]] == [(i, i) for i in range(4)]
    assert max(l["residual_heldout"] for l in res["layers"]) < 1e-4
    assert min(l["residual_identity"] for l in res["layers"]) > 0.5  # the basis is rotated
    M = torch.tensor(_run("cka", a, twin, workload, "streamed")["result"]["matrix"])
    assert torch.allclose(M.diagonal(), torch.ones(4, dtype=M.dtype), atol=1e-5)
    self_res = _run("procrustes", a, a, workload, "streamed")["result"]
    assert max(l["residual_heldout"] for l in self_res["layers"]) < 1e-6


def test_a_cancel_mid_lockstep_leaves_no_weights_behind(folders, workload, one_thread):
    from engine.core.data import load_workload
    from engine.measure.align import alignment_of
    from engine.measure.stream_capture import LayerWalker
    from engine.running.lean_stats import lockstep_pairs

    texts = list(dict.fromkeys(load_workload(workload).texts))
    d = load_model(ModelSpec.parse(folders["tiny-llama-a"]), "cpu", "float32", stream=True)
    t = load_model(ModelSpec.parse(folders["tiny-llama-b"]), "cpu", "float32", stream=True)
    with d.lock, t.lock:
        ra = alignment_of(LayerWalker(d, texts).skeleton(), LayerWalker(t, texts).skeleton())

    def cb(frac, msg):
        if "block 3/" in msg:
            pr.cancel()

    pr = Progress(cb)
    seen = []
    with pytest.raises(Cancelled):
        lockstep_pairs(d, t, texts, ra, [(i, i) for i in range(4)], lambda *a: seen.append(a[:2]),
                       batch_size=4, progress=pr)  # fmt: skip
    assert seen and len(seen) < 4
    for m in (d, t):
        assert all(p.device.type == "meta" for p in m.model.parameters())
    with pytest.raises(GraftError, match="non-decreasing"):
        lockstep_pairs(d, t, texts, ra, [(1, 1), (0, 2)], lambda *a: None, batch_size=4, progress=Progress())


def test_plan_and_refusals(folders, workload):
    specs = [ModelSpec.parse(folders["tiny-llama-a"]), ModelSpec.parse(folders["tiny-llama-b"])]
    kw = dict(dtype="float32", device=torch.device("cpu"), tokens=2048)
    forced = plan_run(specs, stream="auto", lean=True, stats="streamed", **kw)
    assert (forced.route, forced.stats) == (
        "stream",
        "streamed",
    ) and forced.peak_bytes == forced.lean_peak_bytes
    rows = plan_run(specs, stream="on", lean=True, stats="rows", **kw)
    assert rows.stats == "rows" and forced.lean_peak_bytes < rows.peak_bytes
    # a tool without the lean route never plans it
    assert plan_run(specs, stream="on", lean=False, stats="streamed", **kw).stats == "rows"
    # auto: the rows while they fit the budget, the lean route when only it fits
    mib = 1024**2
    roomy = f"{rows.peak_bytes // mib + 8}MiB"
    tight = f"{(rows.peak_bytes + forced.lean_peak_bytes) // 2 // mib}MiB"
    assert plan_run(specs, stream="on", lean=True, stats="auto", max_memory=roomy, **kw).stats == "rows"
    auto = plan_run(specs, stream="on", lean=True, stats="auto", max_memory=tight, **kw)
    assert auto.stats == "streamed" and auto.fits and "--stats streamed" in auto.lines[0]
    with pytest.raises(GraftError, match="--stats streamed needs both models streamed"):
        run_tool("cka", specs[0], specs[1], {"workload": workload, "stream": "off", "stats": "streamed"})
