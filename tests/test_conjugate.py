"""Rank-k conjugation (engine/surgery/conjugate.py, conjugate_maps.py, conjugate_plan.py), module-input
capture (engine/measure/capture.py) and the interference check (engine/evaluation/interference.py).

Ground truth: a model against itself gives identity maps and exactly W + dW; a rotated twin
(engine/surgery/twin.py, residual h' = h Q with random norm gains folded) defeats a plain merge while
conjugation reproduces the base's change, with ridge on the normed inputs, identity inside the
blocks and Procrustes (recovering Q) on the residual writers.
"""

import json
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from engine.adapters.lowrank import ModuleDelta
from engine.core.errors import Cancelled, GraftError
from engine.core.progress import Progress
from engine.evaluation.interference import interference, should_roll_back
from engine.loading.arch import ArchAdapter
from engine.loading.models import LoadedModel, ModelSpec, load_model
from engine.loading.tiny import _CORPUS, build_tiny
from engine.measure.capture import capture
from engine.measure.capture_cache import CaptureCache
from engine.measure.linalg import random_orthogonal
from engine.surgery.conjugate import Conjugation, apply_and_check
from engine.surgery.conjugate_maps import fit_side
from engine.surgery.conjugate_plan import plan_conjugation
from engine.surgery.transplant import SURGERY_CARD
from engine.surgery.twin import rotate_model

TEXTS = list(_CORPUS) + [
    "The quick brown fox jumps over the lazy dog.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Cats sleep for most of the day and hunt at night.",
    "The library opens at nine in the morning on weekdays.",
    "Mountains and rivers shape where people choose to live.",
    "Photosynthesis turns sunlight and water into sugar.",
]
RETAINED = [
    "Cats and dogs are common pets; parrots can learn to speak words.",
    "Light travels faster than sound, which is why we see lightning first.",
    "The orchestra played a symphony in four movements last night.",
    "She said that the library opens at nine in the morning on weekdays.",
]
READERS = ("attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up")
WRITERS = ("attn.o", "mlp.down")


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _loaded(model, tok, name: str) -> LoadedModel:
    return LoadedModel(
        ModelSpec("builtin", name), model, tok, ArchAdapter(model), torch.device("cpu"), torch.float32, ""
    )


@pytest.fixture(scope="module")
def base():
    """tiny-llama-a with random per-channel norm gains (all ones at init), as after training: the
    normed inputs of a rotated twin then differ from the base's by Q^T diag(g), not a rotation."""
    model, tok = build_tiny("tiny-llama-a")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.4 * torch.randn(p.shape, generator=gen))
    return _loaded(model, tok, "tiny-llama-a")


@pytest.fixture(scope="module")
def twin(base):
    model, q = rotate_model(base.model, seed=7)
    return _loaded(model, base.tokenizer, "tiny-llama-a-twin"), q.double()


def _planted(model: LoadedModel, layers=(1, 2), rank=2, scale=0.3, seed=11) -> list[ModuleDelta]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in model.arch.linear_modules():
        if m.layer in layers:
            o, i = m.shape
            out.append(
                ModuleDelta(
                    m.name,
                    m.layer,
                    m.canonical,
                    m.kind,
                    scale * torch.randn(o, rank, generator=g),
                    torch.randn(rank, i, generator=g) / i**0.5,
                )
            )
    return out


def _ids(tok, text="The river flows north through the valley and into the cold sea."):
    return torch.tensor([tok(text)["input_ids"]])


def _merged(model: LoadedModel, deltas) -> torch.nn.Module:
    """A plain merge: W + dW in the model's own coordinates (what PEFT's merge does)."""
    import copy

    paths = {m.name: m.path for m in model.arch.linear_modules()}
    out = copy.deepcopy(model.model)
    with torch.no_grad():
        for d in deltas:
            out.get_submodule(paths[d.name]).weight += d.B @ d.A
    return out


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits.double()


# =============================================================================================
# capture: module inputs
# =============================================================================================


@pytest.mark.parametrize("name", ["tiny-llama-a", "tiny-gpt2-a"])
def test_module_inputs_are_what_each_module_reads(name):
    m = load_model(ModelSpec.parse(name), "cpu")
    mods = [x for x in m.arch.linear_modules() if x.layer == 1]
    names = [x.name for x in mods]
    cap = capture(m, TEXTS[:3], modules=names, module_inputs=names, batch_size=2)
    slim = capture(m, TEXTS[:3], module_inputs=names, residual=False, batch_size=1)
    assert slim.residual.shape == (0, cap.n, m.arch.hidden_size) and slim.n == cap.n and not slim.modules
    for x in mods:
        X = cap.module_inputs[x.name]
        assert X.shape == (cap.n, x.shape[1]) and X.dtype == torch.float32
        mod = m.arch.module(x.path)
        W = mod.weight.t() if x.conv1d else mod.weight
        pred = X @ W.T + (mod.bias if mod.bias is not None else 0)
        assert torch.allclose(pred, cap.modules[x.name], atol=1e-5), x.name
        assert torch.allclose(slim.module_inputs[x.name], X, atol=1e-5)
    if name == "tiny-llama-a":  # q, k, v read one tensor (and gate, up another): one captured copy each
        ins = cap.module_inputs
        assert ins["blocks.1.attn.q"] is ins["blocks.1.attn.k"] is ins["blocks.1.attn.v"]
        assert ins["blocks.1.mlp.gate"] is ins["blocks.1.mlp.up"]
        assert ins["blocks.1.attn.o"] is not ins["blocks.1.attn.q"]


def test_capture_cache_keys_on_module_inputs():
    m = load_model(ModelSpec.parse("tiny-llama-a"), "cpu")
    cache = CaptureCache()
    plain = cache.get(m, TEXTS[:2])
    assert cache.get(m, TEXTS[:2]) is plain
    with_in = cache.get(m, TEXTS[:2], module_inputs=["blocks.0.attn.o"])
    assert with_in is not plain and "blocks.0.attn.o" in with_in.module_inputs and not plain.module_inputs
    slim = cache.get(m, TEXTS[:2], module_inputs=["blocks.0.attn.o"], residual=False)
    assert slim is not with_in and slim.residual.shape[0] == 0


# =============================================================================================
# fit_side on planted relations
# =============================================================================================


def test_fit_side_rules_on_planted_maps():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 16, generator=g, dtype=torch.float64) + 0.5  # raw rows with a mean
    group = torch.arange(400) // 10  # 40 "texts"
    fit = group % 4 != 0
    held = ~fit
    kw = dict(group=group)
    same = fit_side(X, X.clone(), fit, held, **kw)
    assert same.kind == "identity" and same.heldout_residual == 0.0 and same.residuals["procrustes"] is None
    Q = random_orthogonal(16, seed=3)
    rot = fit_side(X, 2.0 * X @ Q, fit, held, **kw)  # a scaled rotation: the scale lives in the map
    assert rot.kind == "procrustes" and rot.heldout_residual < 1e-20
    assert abs(rot.scale - 2.0) < 1e-9 and torch.allclose(rot.matrix, 2.0 * Q, atol=1e-9)
    D = torch.diag(torch.linspace(0.3, 3.0, 16, dtype=torch.float64))
    lin = fit_side(X, X @ Q @ D, fit, held, **kw)  # linear, not a rotation
    assert lin.kind == "ridge" and lin.heldout_residual < 1e-6 < lin.residuals["procrustes"]
    assert lin.ridge_alpha is not None and lin.ridge_alpha <= 1e-4
    wide = fit_side(X, X @ torch.randn(16, 24, generator=g, dtype=torch.float64), fit, held, **kw)
    assert wide.residuals["identity"] is None and wide.matrix.shape == (16, 24)
    noise = fit_side(X, torch.randn(400, 16, generator=g, dtype=torch.float64), fit, held, **kw)
    assert noise.kind == "identity" or noise.heldout_residual > 0.5  # nothing explains pure noise
    forced = fit_side(X, X @ Q, fit, held, force="ridge", **kw)
    assert forced.kind == "ridge" and forced.reason == "forced"
    with pytest.raises(GraftError, match="widths differ"):
        fit_side(X, X[:, :8], fit, held, force="identity")


# =============================================================================================
# (a) same coordinates
# =============================================================================================


def test_same_coordinates_gives_identity_maps_and_the_plain_merge(base):
    deltas = _planted(base)
    h_base = base.state_hash()
    plan = plan_conjugation(base, base, deltas, TEXTS)
    assert plan.layer_map == [(i, i) for i in range(base.arch.n_layers)]
    assert plan.layer_map_source == "identity (same model)"
    assert len(plan.conjugated) == len(deltas) and not plan.skipped
    for mp in plan.conjugated:
        assert mp.target_name == mp.name and mp.k == mp.rank == 2 and mp.energy_kept == pytest.approx(1.0)
        assert mp.input.kind == mp.output.kind == "identity"
        assert mp.input.heldout_residual == 0.0 and mp.output.heldout_residual == 0.0
        assert torch.equal(mp.B, next(d.B for d in deltas if d.name == mp.name))
    conj = Conjugation(base, plan)
    conj.apply()
    paths = {m.name: m.path for m in base.arch.linear_modules()}
    for d in deltas:
        w = conj.working.get_submodule(paths[d.name]).weight
        assert float((w - (base.arch.module(paths[d.name]).weight + d.B @ d.A)).abs().max().detach()) <= 1e-6
    ids = _ids(base.tokenizer)
    assert torch.allclose(_logits(conj.working, ids), _logits(_merged(base, deltas), ids), atol=1e-5)
    rep = plan.report()
    json.dumps(rep, allow_nan=False)
    assert rep["map_counts"] == {
        "input": {"identity": 14, "procrustes": 0, "ridge": 0},
        "output": {"identity": 14, "procrustes": 0, "ridge": 0},
    }
    conj.rollback()
    assert conj.verify_rollback() and base.state_hash() == h_base


def test_truncation_to_rank_k_and_by_energy(base):
    deltas = _planted(base, layers=(2,), rank=3)
    plan = plan_conjugation(base, base, deltas, TEXTS, k=1, layer_map=[(i, i) for i in range(4)])
    assert plan.layer_map_source == "given"
    for mp in plan.conjugated:
        d = next(x for x in deltas if x.name == mp.name)
        U, S, Vh = torch.linalg.svd((d.B @ d.A).double())
        best = S[0] * torch.outer(U[:, 0], Vh[0])  # Eckart-Young rank 1
        assert mp.k == 1 and mp.rank == 3
        assert torch.allclose((mp.B @ mp.A).double(), best, atol=1e-5)
        assert mp.energy_kept == pytest.approx(float(S[0] ** 2 / (S**2).sum()), rel=1e-6)
    full = plan_conjugation(base, base, deltas, TEXTS, energy=1.0, layer_map=[(i, i) for i in range(4)])
    assert all(mp.k == 3 for mp in full.conjugated)
    some = plan_conjugation(base, base, deltas, TEXTS, energy=0.5, layer_map=[(i, i) for i in range(4)])
    assert all(1 <= mp.k <= 3 and mp.energy_kept >= 0.5 - 1e-9 for mp in some.conjugated)


# =============================================================================================
# (b) rotated twin
# =============================================================================================


def test_rotated_twin_plain_merge_fails_conjugation_recovers(base, twin):
    tw, Q = twin
    deltas = _planted(base)
    plan = plan_conjugation(base, tw, deltas, TEXTS, keep_maps=True)
    assert plan.layer_map == [(i, i) for i in range(4)] and len(plan.conjugated) == len(deltas)
    for mp in plan.conjugated:
        if mp.canonical in READERS:
            assert mp.input.kind == "ridge", mp.name  # Q^T diag(g): not a rotation
            assert mp.input.heldout_residual < 1e-6 < mp.input.residuals["procrustes"]
            assert mp.output.kind == "identity", mp.name  # head / MLP hidden spaces coincide
        else:
            assert mp.input.kind == "identity", mp.name
            assert mp.output.kind == "procrustes", mp.name  # the residual stream: O_T = O_B Q
            assert torch.allclose(mp.output.matrix, Q, atol=1e-4)
            assert mp.output.scale == pytest.approx(1.0, abs=1e-5)
    # The update in the twin's coordinates is the construction's ground truth (engine/surgery/twin.py):
    # readers dW diag(g) Q, writers Q^T dW.
    for mp in plan.conjugated:
        d = next(x for x in deltas if x.name == mp.name)
        dW = (d.B @ d.A).double()
        if mp.canonical in READERS:
            norm = "input_layernorm" if mp.kind == "attention" else "post_attention_layernorm"
            g = getattr(base.model.model.layers[mp.layer], norm).weight.detach().double()
            truth = dW * g[None, :] @ Q
        else:
            truth = Q.T @ dW
        got = (mp.B @ mp.A).double()
        assert float((got - truth).norm() / truth.norm()) < 1e-3, mp.name

    ids = _ids(base.tokenizer)
    effect = _logits(_merged(base, deltas), ids) - _logits(base.model, ids)
    conj = Conjugation(tw, plan)
    conj.apply()
    conj_err = float((_logits(conj.working, ids) - _logits(tw.model, ids) - effect).norm() / effect.norm())
    plain_err = float(
        (_logits(_merged(tw, deltas), ids) - _logits(tw.model, ids) - effect).norm() / effect.norm()
    )
    assert conj_err < 1e-2 < 0.5 < plain_err
    # force="identity" is the plain merge.
    plain_plan = plan_conjugation(base, tw, deltas, TEXTS, force="identity")
    assert all(mp.input.kind == mp.output.kind == "identity" for mp in plain_plan.conjugated)
    plain = Conjugation(tw, plain_plan)
    plain.apply()
    assert torch.allclose(_logits(plain.working, ids), _logits(_merged(tw, deltas), ids), atol=1e-5)


# =============================================================================================
# (c) reversibility
# =============================================================================================


def test_rollback_is_bit_exact_and_inputs_are_untouched(base, twin):
    tw, _ = twin
    h_base, h_twin = base.state_hash(), tw.state_hash()
    deltas = _planted(base, layers=(0, 3))
    plan = plan_conjugation(base, tw, deltas, TEXTS)
    conj = Conjugation(tw, plan)
    working = conj.materialise()
    assert conj.materialise() is working
    assert conj.extra_bytes() == conj.touched_bytes > 0  # only the touched weights are copies
    assert conj.hash_before() == h_twin == conj.weight_hash()
    assert set(conj.apply()) == set(plan.target_modules())
    assert conj.apply() == ()  # already applied
    h_after = conj.weight_hash()
    assert h_after != h_twin and conj.extra_bytes() == conj.touched_bytes
    assert conj.rollback() == len(conj.modules)
    assert conj.weight_hash() == h_twin and conj.verify_rollback()
    conj.apply()
    assert conj.weight_hash() == h_after  # deterministic re-apply
    conj.rollback()
    again = Conjugation(tw, plan_conjugation(base, tw, deltas, TEXTS))
    again.apply()
    assert again.weight_hash() == h_after  # the same plan twice: identical weights
    assert base.state_hash() == h_base and tw.state_hash() == h_twin
    sub = Conjugation(tw, plan, modules=[plan.target_modules()[0]])
    sub.apply()
    assert sub.applied == (plan.target_modules()[0],)
    with pytest.raises(GraftError, match="no update"):
        Conjugation(tw, plan, modules=["blocks.1.attn.q"])


def test_save_writes_a_loadable_folder_with_a_surgery_card(base, twin, tmp_path):
    tw, _ = twin
    conj = Conjugation(tw, plan_conjugation(base, tw, _planted(base, layers=(1,)), TEXTS))
    conj.apply()
    out = conj.save(str(tmp_path / "t_prime"), results={"note": "test"})
    card = json.loads((tmp_path / "t_prime" / SURGERY_CARD).read_text())
    assert card["operation"] == "rank-k conjugation" and card["base"] == "tiny-llama-a"
    assert card["weight_hash_after"] == conj.weight_hash() == card["saved_weight_hash"]
    assert card["plan"]["n_conjugated"] == 7 and card["results"] == {"note": "test"}
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(base.tokenizer)
    assert torch.equal(_logits(again, ids), _logits(conj.working, ids))


# =============================================================================================
# (d) across tokenizers, widths and families
# =============================================================================================


def _llama48(tok) -> LoadedModel:
    cfg = LlamaConfig(
        num_hidden_layers=3,
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=len(tok),
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(4)
    return _loaded(AutoModelForCausalLM.from_config(cfg).eval(), tok, "tiny-llama-48")


def test_cross_tokenizer_cross_width_cross_family():
    gpt2 = load_model(ModelSpec.parse("tiny-gpt2-a"), "cpu")
    target = _llama48(build_tiny("tiny-llama-b")[1])
    deltas = _planted(gpt2, layers=(0, 1, 2, 3), rank=4)
    plan = plan_conjugation(gpt2, target, deltas, TEXTS, k=2)
    rep = plan.report()
    json.dumps(rep, allow_nan=False)
    assert rep["alignment"] == "word" and rep["n_rows"] > 0
    assert [i for i, _ in plan.layer_map] == [0, 1, 2, 3] and all(0 <= j < 3 for _, j in plan.layer_map)
    skipped = {m.name: m.reason for m in plan.skipped}
    assert set(skipped) == {f"blocks.{i}.attn.qkv" for i in range(4)}
    assert all("no attn.qkv" in r for r in skipped.values())
    assert {m.canonical for m in plan.conjugated} == {"attn.o", "mlp.up", "mlp.down"}
    for mp in plan.conjugated:
        assert mp.k == 2
        tm = next(x for x in target.arch.linear_modules() if x.name == mp.target_name)
        assert tuple(mp.B.shape) == (tm.shape[0], 2) and tuple(mp.A.shape) == (2, tm.shape[1])
        for side in (mp.input, mp.output):
            assert side.kind in ("procrustes", "ridge")  # widths differ or nothing coincides
            vals = [
                v for v in list(side.residuals.values()) + list(side.fit_residuals.values()) if v is not None
            ]
            assert vals and all(torch.isfinite(torch.tensor(v)) for v in vals)
    conj = Conjugation(target, plan)
    conj.apply()  # several base layers can land on one target layer: their updates add up
    assert len(conj.modules) <= len(plan.conjugated)
    assert torch.isfinite(_logits(conj.working, _ids(target.tokenizer))).all()
    conj.rollback()
    assert conj.verify_rollback()


def test_refusals(base):
    gpt2 = load_model(ModelSpec.parse("tiny-gpt2-a"), "cpu")
    with pytest.raises(GraftError, match="wrong base"):
        plan_conjugation(
            gpt2,
            base,
            [ModuleDelta("blocks.0.attn.o", 0, "attn.o", "attention", torch.ones(64, 1), torch.ones(1, 32))],
            TEXTS,
        )
    with pytest.raises(GraftError, match="out of range"):
        plan_conjugation(base, base, _planted(base), TEXTS, layer_map=[(0, 9)])
    with pytest.raises(GraftError, match="no module deltas"):
        plan_conjugation(base, base, [], TEXTS)
    head = ModuleDelta("lm_head", -1, "lm_head", "other", torch.ones(10, 1), torch.ones(1, 64))
    plan = plan_conjugation(base, base, _planted(base, layers=(0,))[:1] + [head], TEXTS)
    assert [m.name for m in plan.skipped] == ["lm_head"] and "not a block linear module" in plan.skipped[
        0
    ].reason


def test_progress_reports_and_cancels(base):
    seen = []
    plan_conjugation(
        base, base, _planted(base, layers=(0,)), TEXTS, progress=Progress(lambda f, m: seen.append(f))
    )
    assert seen and seen == sorted(seen) and seen[-1] == 1.0
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        plan_conjugation(base, base, _planted(base, layers=(0,)), TEXTS, progress=Progress(None, ev))


# =============================================================================================
# (e) interference and the automatic roll back
# =============================================================================================


def test_interference_of_identical_models_is_nil(base):
    rep = interference(base.model, base.model, base.tokenizer, RETAINED, max_new_tokens=6, prompt_tokens=5)
    json.dumps(rep, allow_nan=False)
    assert rep["locality"] == 1.0 and rep["n_prompts"] == len(RETAINED) and rep["n_changed"] == 0
    assert rep["ppl_change_fraction"] == 0.0 and rep["ppl_before"] == rep["ppl_after"] > 1
    assert all(
        r["loss_change"] == 0.0 and not r["changed"] and r["before"] == r["after"] for r in rep["per_example"]
    )
    roll, why = should_roll_back(rep, 0.05)
    assert not roll and "within the 5% threshold" in why


def test_damaging_transplant_is_rolled_back(base):
    h = base.state_hash()
    # A random tiny model predicts almost uniformly (perplexity ~ its vocabulary), so no block
    # update can make it much worse: this large one costs ~+2.5%, past a 1% threshold.
    big = _planted(base, layers=(0, 1, 2, 3), rank=4, scale=20.0, seed=3)
    conj = Conjugation(base, plan_conjugation(base, base, big, TEXTS))
    out = apply_and_check(conj, RETAINED, max_ppl_increase=0.01, max_new_tokens=6, prompt_tokens=5)
    json.dumps(out, allow_nan=False)
    rep = out["interference"]
    assert rep["ppl_change_fraction"] > 0.01 and rep["locality"] < 1.0
    assert out["rolled_back"] and "past the 1% threshold" in out["roll_back_reason"]
    assert out["rollback_bit_exact"] and conj.applied == () and out["target_untouched"]
    assert rep["worst"] and rep["per_example"][rep["worst"][0]]["loss_change"] == rep["max_loss_increase"]
    # A threshold the damage stays under keeps it applied; the floor on locality can still refuse it.
    conj2 = Conjugation(base, conj.plan)
    kept = apply_and_check(conj2, RETAINED, max_ppl_increase=1e9, max_new_tokens=6, prompt_tokens=5)
    assert not kept["rolled_back"] and kept["rollback_bit_exact"] is None and conj2.applied
    assert should_roll_back(kept["interference"], None, min_locality=1.0)[0]
    assert base.state_hash() == h
