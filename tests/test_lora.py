"""Model Surgery stage 1: LoRA / fine-tune deltas (engine.adapters.lora), T5 concept cartography, T6 spectrum.

Ground truths: a planted rank-2 update in three chosen modules of a tiny model (as a PEFT adapter
and as a full fine-tune donor/base pair), PEFT's own merge_and_unload for every scaling rule, and
dense SVDs of small matrices.
"""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.adapters.finetune_delta import finetune_deltas
from engine.adapters.lora import resolve_adapter
from engine.adapters.lora_factors import adapter_deltas
from engine.adapters.lowrank import (
    ModuleDelta,
    effective_rank,
    factored_svd,
    k_at_energy,
    randomized_svd,
    truncate,
)
from engine.core.errors import GraftError
from engine.loading.arch import ArchAdapter, linear_weight_out_in
from engine.loading.models import LoadedModel, ModelSpec, ModelStore
from engine.running.runner import run_tool

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The planted update: three modules of tiny-llama-a, each a rank-2 dW with these singular values.
PLANTED = {
    "blocks.1.attn.v": (3.0, 1.25),
    "blocks.2.mlp.down": (2.5, 0.75),
    "blocks.3.attn.q": (2.0, 1.5),
}


def _orthonormal(n, k, gen):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q


def _planted_factors(shapes):
    """name -> (U diag(S), V^T) float64 for every planted module, shapes from the model."""
    gen = torch.Generator().manual_seed(7)
    out = {}
    for name, s in PLANTED.items():
        o, i = shapes[name]
        U, V = _orthonormal(o, 2, gen), _orthonormal(i, 2, gen)
        out[name] = (U * torch.tensor(s, dtype=torch.float64), V.T)
    return out


def _one_line(exc_info):
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, msg
    return msg


# =============================================================================================
# linear algebra
# =============================================================================================
@pytest.mark.parametrize("m,r,n", [(50, 6, 40), (5, 8, 7), (64, 16, 300)])
def test_factored_svd_equals_dense_svd(m, r, n):
    gen = torch.Generator().manual_seed(m * n)
    B = torch.randn(m, r, generator=gen)
    A = torch.randn(r, n, generator=gen)
    U, S, Vh = factored_svd(B, A)
    dense = B.double() @ A.double()
    S_ref = torch.linalg.svdvals(dense)
    k = min(m, n, r)
    assert S.shape == (k,) and U.shape == (m, k) and Vh.shape == (k, n)
    assert torch.allclose(S, S_ref[:k], atol=1e-10, rtol=1e-10)
    assert torch.allclose(U @ torch.diag(S) @ Vh, dense, atol=1e-9)
    assert torch.allclose(U.T @ U, torch.eye(k, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(Vh @ Vh.T, torch.eye(k, dtype=torch.float64), atol=1e-10)
    assert (torch.diff(S) <= 1e-12).all()


def test_truncate_is_the_best_rank_k():
    gen = torch.Generator().manual_seed(3)
    d = ModuleDelta(
        "blocks.0.attn.q",
        0,
        "attn.q",
        "attention",
        torch.randn(40, 6, generator=gen),
        torch.randn(6, 30, generator=gen),
    )
    U, S, Vh = torch.linalg.svd(d.dense().double(), full_matrices=False)
    for k in (1, 3, 6, 99):
        t = truncate(d, k)
        kk = min(k, 6)
        assert t.rank == kk and t.B.dtype == torch.float32
        best = U[:, :kk] @ torch.diag(S[:kk]) @ Vh[:kk]
        assert torch.allclose(t.dense().double(), best, atol=1e-5)
    with pytest.raises(GraftError):
        truncate(d, 0)


def test_effective_rank_and_k_at_energy():
    assert effective_rank([1.0, 1.0, 1.0, 1.0]) == pytest.approx(4.0)
    assert effective_rank([2.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert effective_rank([0.0, 0.0]) == 0.0
    assert 1.0 < effective_rank([3.0, 1.0]) < 2.0
    # energies 9, 4, 1 of 14: cumulative 0.643, 0.929, 1
    assert k_at_energy([3.0, 2.0, 1.0], 0.9) == 2
    assert k_at_energy([3.0, 2.0, 1.0], 0.5) == 1
    assert k_at_energy([3.0, 2.0, 1.0], 1.0) == 3
    assert k_at_energy([3.0, 2.0, 1.0], 0.9, total=100.0) is None  # truncated spectrum: not reached
    assert k_at_energy([0.0, 0.0], 0.9) == 0
    with pytest.raises(GraftError):
        k_at_energy([1.0], 0.0)


def test_randomized_svd_recovers_the_top_of_a_decaying_spectrum():
    gen = torch.Generator().manual_seed(11)
    U, V = _orthonormal(300, 120, gen), _orthonormal(200, 120, gen)
    s = torch.tensor([0.7**i for i in range(120)], dtype=torch.float64)
    M = U @ torch.diag(s) @ V.T
    Uk, Sk, Vk = randomized_svd(M, 10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(Sk, s[:10], rtol=1e-8, atol=1e-12)
    again = randomized_svd(M, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[1], Sk)


# =============================================================================================
# planted rank-2 update: adapter and full fine-tune
# =============================================================================================
def _tiny_shapes(name="tiny-llama-a"):
    from engine.loading.tiny import build_tiny

    model, _ = build_tiny(name)
    return {m.name: m.shape for m in ArchAdapter(model).linear_modules()}


@pytest.fixture(scope="module")
def planted_adapter(tmp_path_factory):
    """A PEFT adapter (written by peft) on tiny-llama-a, rank 2, alpha 4 (scale 2, exact in
    float32): the planted modules hold their rank-2 update, every other module a tiny one."""
    from peft import LoraConfig, get_peft_model

    from engine.loading.tiny import build_tiny

    with torch.random.fork_rng(devices=[]):
        model, _ = build_tiny("tiny-llama-a")
        arch = ArchAdapter(model)
        paths = {m.path: m.name for m in arch.linear_modules()}
        shapes = {m.name: m.shape for m in arch.linear_modules()}
        pm = get_peft_model(
            model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=LLAMA_TARGETS)
        )
    planted = _planted_factors(shapes)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if not hasattr(mod, "lora_A") or "default" not in getattr(mod, "lora_A", {}):
                continue
            canon = paths[name.removeprefix("base_model.model.")]
            A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            if canon in planted:
                Bp, Ap = planted[canon]
                B.copy_((Bp / 2.0).float())
                A.copy_(Ap.float())
            else:
                B.copy_(torch.randn(B.shape, generator=gen) * 1e-3)
    out = tmp_path_factory.mktemp("planted") / "adapter"
    pm.save_pretrained(str(out), safe_serialization=True)
    return str(out)


@pytest.fixture(scope="module")
def planted_finetune():
    """(donor, base) LoadedModels: base tiny-llama-a; donor = base + the planted rank-2 updates in
    their modules and 1e-4 Gaussian noise in every other linear module."""
    base = ModelStore().get(ModelSpec.parse("tiny-llama-a"), "cpu")
    shapes = {m.name: m.shape for m in base.arch.linear_modules()}
    planted = _planted_factors(shapes)
    model = copy.deepcopy(base.model)
    arch = ArchAdapter(model)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for m in arch.linear_modules():
            w = linear_weight_out_in(arch.module(m.path))
            if m.name in planted:
                Bp, Ap = planted[m.name]
                w.add_((Bp @ Ap).float())
            else:
                w.add_(torch.randn(w.shape, generator=gen) * 1e-4)
    donor = LoadedModel(
        ModelSpec("path", "/planted/donor"),
        model,
        base.tokenizer,
        arch,
        torch.device("cpu"),
        torch.float32,
        "",
    )
    return donor, base


def _check_planted(env_cart, env_spec, tol):
    r = env_cart["result"]
    assert set(r["ranking"][:3]) == set(PLANTED)
    cells = {c["name"]: c for c in r["cells"]}
    fourth = cells[r["ranking"][3]]["energy"]
    for name, s in PLANTED.items():
        c = cells[name]
        assert c["top_sv"] == pytest.approx(s[0], abs=tol)
        assert c["energy"] == pytest.approx((s[0] ** 2 + s[1] ** 2) ** 0.5, abs=tol)
        assert c["energy"] > 100 * fourth
        assert 1.0 < c["effective_rank"] < 2.0
    assert sum(c["share"] for c in r["cells"]) == pytest.approx(1.0, abs=1e-9)
    assert sum(r["kind_shares"].values()) == pytest.approx(1.0, abs=1e-9)
    mods = {m["name"]: m for m in env_spec["result"]["modules"]}
    for name, s in PLANTED.items():
        sv = mods[name]["singular_values"]
        assert abs(sv[0] - s[0]) < 1e-6 and abs(sv[1] - s[1]) < 1e-6, (name, sv[:3])
        assert all(abs(x) < 1e-3 for x in sv[2:])
        cum = mods[name]["energy_cumulative"]
        assert cum[1] == pytest.approx(1.0, abs=1e-6)
        share1 = s[0] ** 2 / (s[0] ** 2 + s[1] ** 2)
        assert mods[name]["k_at_threshold"] == (1 if share1 >= 0.9 else 2)
    json.dumps(env_cart, allow_nan=False)
    json.dumps(env_spec, allow_nan=False)


def test_planted_adapter_cartography_and_spectrum(planted_adapter):
    cart = run_tool("cartography", adapter=planted_adapter)
    spec = run_tool("spectrum", adapter=planted_adapter)
    _check_planted(cart, spec, 1e-6)
    r = cart["result"]
    assert r["source"]["kind"] == "adapter" and r["totals"]["n_modules"] == 28
    assert r["layers"] == [0, 1, 2, 3] and r["modules"] == [
        "attn.q",
        "attn.k",
        "attn.v",
        "attn.o",
        "mlp.gate",
        "mlp.up",
        "mlp.down",
    ]
    assert r["grid"]["top_sv"][1][2] == pytest.approx(3.0, abs=1e-6)  # layer 1, attn.v
    assert r["warnings"] == []


def test_planted_finetune_cartography_and_spectrum(planted_finetune):
    donor, base = planted_finetune
    cart = run_tool("cartography", donor, None, {}, {"rank": 4}, base=base)
    spec = run_tool("spectrum", donor, None, {}, {"rank": 4}, base=base)
    _check_planted(cart, spec, 1e-6)
    r = cart["result"]
    assert r["source"]["kind"] == "finetune" and r["source"]["rank"] == 4
    cells = {c["name"]: c for c in r["cells"]}
    for name in PLANTED:
        assert cells[name]["captured_share"] == pytest.approx(1.0, abs=1e-7)  # float32 storage noise
    # noise modules: 4 of 64 directions of an isotropic update are captured, and k is undetermined
    noise = cells["blocks.0.attn.q"]
    assert noise["captured_share"] < 0.5
    mods = {m["name"]: m for m in spec["result"]["modules"]}
    assert mods["blocks.0.attn.q"]["k_at_threshold"] is None
    assert spec["result"]["summary"]["n_undetermined"] == 28 - 3
    assert any("raise --rank" in w for w in spec["result"]["warnings"])


def test_finetune_deltas_are_deterministic_and_filter_independent(planted_finetune):
    donor, base = planted_finetune
    a = finetune_deltas(donor, base, 3, seed=1, cache=False)
    b = finetune_deltas(donor, base, 3, seed=1, cache=False)
    c = finetune_deltas(donor, base, 3, seed=1, select=lambda n: n == "blocks.0.mlp.up", cache=False)
    cached = finetune_deltas(donor, base, 3, seed=1)
    again = finetune_deltas(donor, base, 3, seed=1)
    assert [d.name for d in a] == [d.name for d in b] and len(c) == 1
    for x, y in zip(a, b):
        assert torch.equal(x.B, y.B) and torch.equal(x.A, y.A) and x.frob_norm == y.frob_norm
    ref = {d.name: d for d in a}
    assert torch.equal(c[0].B, ref["blocks.0.mlp.up"].B)
    for x in again:
        assert torch.equal(x.B, ref[x.name].B)
    assert len(cached) == len(a)


# =============================================================================================
# PEFT conformance: scaling rules, patterns, GPT-2 Conv1D, an adapter written by peft itself
# =============================================================================================
def _peft_truth(tmp_path, model_name, **config):
    """Save a peft adapter (random nonzero factors) and return (folder, {name: dW (out, in)}),
    the truth being PEFT's own merge_and_unload minus the original weights."""
    from peft import LoraConfig, get_peft_model

    from engine.loading.tiny import build_tiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = build_tiny(model_name)
        arch = ArchAdapter(model)
        before = {
            m.name: linear_weight_out_in(arch.module(m.path)).detach().clone() for m in arch.linear_modules()
        }
        pm = get_peft_model(model, LoraConfig(lora_dropout=0.0, init_lora_weights=False, **config))
    out = tmp_path / f"{model_name}-adapter"
    pm.save_pretrained(str(out), safe_serialization=True)
    merged = pm.merge_and_unload()
    marc = ArchAdapter(merged)
    truth = {
        m.name: (linear_weight_out_in(marc.module(m.path)).detach() - before[m.name])
        for m in marc.linear_modules()
    }
    return str(out), truth


@pytest.mark.parametrize(
    "model_name,config",
    [
        ("tiny-llama-a", dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)),
        ("tiny-llama-a", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_TARGETS)),
        (
            "tiny-llama-a",
            dict(
                r=4,
                lora_alpha=8,
                target_modules=LLAMA_TARGETS,
                rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                alpha_pattern={"v_proj": 3},
            ),
        ),
        (
            "tiny-gpt2-a",
            dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        ),
    ],
    ids=["llama", "rslora", "rank-alpha-patterns", "gpt2-conv1d-fan-in-fan-out"],
)
def test_adapter_deltas_match_peft_merge(tmp_path, model_name, config):
    path, truth = _peft_truth(tmp_path, model_name, **config)
    deltas = adapter_deltas(resolve_adapter(path))
    got = {d.name: d for d in deltas}
    assert set(got) == {n for n, t in truth.items() if t.abs().max() > 0}
    for name, d in got.items():
        assert d.known and d.shape == tuple(truth[name].shape)
        assert torch.allclose(d.dense(), truth[name], atol=2e-6, rtol=1e-4), name
    if config.get("use_rslora"):
        assert all(d.scale == pytest.approx(8 / 2.0) for d in deltas)
    if "rank_pattern" in config:
        assert got["blocks.0.attn.q"].rank == 2 and got["blocks.1.mlp.down"].rank == 6
        assert got["blocks.0.mlp.down"].rank == 4
        assert got["blocks.2.attn.v"].scale == pytest.approx(3 / 4)
    if model_name == "tiny-gpt2-a":
        assert {d.module for d in deltas} == {"attn.qkv", "attn.o", "mlp.up", "mlp.down"}
        assert got["blocks.0.attn.qkv"].shape == (192, 64)


def test_peft_written_adapter_loads_and_maps(tiny_adapter):
    env = run_tool("cartography", adapter=tiny_adapter["path"])
    r = env["result"]
    assert len(r["cells"]) == 4 * 7 and all(c["known"] for c in r["cells"])
    assert all(c["rank"] == 4 and c["energy"] > 0 for c in r["cells"])
    assert r["source"]["adapter"]["config"]["r"] == 4
    assert json.loads(json.dumps(env, allow_nan=False)) == env
    # with its base: the shapes are checked, the result is the same
    with_base = run_tool(
        "cartography", adapter=tiny_adapter["path"], base=ModelSpec.parse(tiny_adapter["base"])
    )
    assert with_base["result"]["cells"] == r["cells"] and with_base["result"]["source"]["base_checked"]
    spec = run_tool("spectrum", adapter=tiny_adapter["path"], params={"modules": "attn.q,layer:3"})
    names = [m["name"] for m in spec["result"]["modules"]]
    assert len(names) == 4 + 7 - 1 and "blocks.3.mlp.up" in names and "blocks.0.attn.q" in names


def test_unknown_names_embedding_lora_and_adapter_names(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    pre = "base_model.model."
    save_file(
        {
            pre + "model.layers.0.self_attn.q_proj.lora_A.default.weight": r(2, 16),
            pre + "model.layers.0.self_attn.q_proj.lora_B.default.weight": r(16, 2),
            pre + "model.layers.1.mlp.experts.0.w1.lora_A.weight": r(2, 16),
            pre + "model.layers.1.mlp.experts.0.w1.lora_B.weight": r(32, 2),
            pre + "lm_head.lora_A.weight": r(2, 16),
            pre + "lm_head.lora_B.weight": r(100, 2),
            pre + "model.embed_tokens.lora_embedding_A": r(2, 100),
            pre + "model.embed_tokens.lora_embedding_B": r(16, 2),
            pre + "model.layers.0.self_attn.q_proj.lora_B.bias": r(16),
        },
        str(tmp_path / "adapter_model.safetensors"),
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    from engine.adapters.lora_factors import AdapterReport

    rep = AdapterReport()
    ds = {d.name: d for d in adapter_deltas(resolve_adapter(str(tmp_path)), report=rep)}
    assert ds["blocks.0.attn.q"].known and ds["blocks.0.attn.q"].kind == "attention"
    ex = ds["blocks.1.mlp.experts.0.w1"]
    assert not ex.known and ex.kind == "mlp" and ex.layer == 1 and ex.shape == (32, 16)
    assert ds["lm_head"].layer == -1 and ds["lm_head"].kind == "other"
    assert ds["model.embed_tokens"].shape == (100, 16)
    assert any("no Graft layout knows" in w for w in rep.warnings)
    assert any("outside the transformer blocks" in w for w in rep.warnings)
    assert any("not LoRA factors" in w for w in rep.warnings)
    env = run_tool("cartography", adapter=str(tmp_path))
    assert env["result"]["modules"] == ["attn.q", "mlp.experts.0.w1"]
    assert env["result"]["warnings"]


# =============================================================================================
# make-donor folders, the demo donor
# =============================================================================================
def test_make_donor_folder_resolves_to_its_adapter(tiny_adapter, tmp_path):
    donor = tmp_path / "mydonor"
    shutil.copytree(tiny_adapter["path"], donor / "adapter")
    (donor / "card.json").write_text(
        json.dumps(
            {
                "format": "graft-donor/1",
                "base_name": "tiny-llama-a",
                "adapter_dir": "adapter",
                "merged_dir": "merged",
            }
        )
    )
    for given in (donor, donor / "adapter", donor / "adapter" / "adapter_model.safetensors"):
        ref = resolve_adapter(str(given))
        assert ref.path == (donor / "adapter").resolve() and ref.base_hint == "tiny-llama-a" and ref.card
    env = run_tool("cartography", adapter=str(donor), base=ModelSpec.parse("tiny-llama-a"))
    assert env["result"]["totals"]["n_modules"] == 28


def test_demo_donor_name_resolves():
    from engine.loading.models import DEMO_DONOR, SMOLLM2, demo_donor_ready

    if not demo_donor_ready():
        with pytest.raises(GraftError, match="not built"):
            resolve_adapter(DEMO_DONOR)
        pytest.skip("the demo donor is not built here (python -m engine prepare)")
    ref = resolve_adapter(DEMO_DONOR)
    assert ref.base_hint == SMOLLM2 and ref.path.name == "adapter"
    deltas = adapter_deltas(ref, n_layers=30)
    assert len(deltas) == 30 * 7 and all(d.known and d.rank == 8 for d in deltas)


# =============================================================================================
# export
# =============================================================================================
def test_export_round_trip(planted_adapter, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "map"
    env = run_tool("cartography", adapter=planted_adapter, params={"export": str(out), "top_k": 1})
    ex = env["result"]["export"]
    assert ex["path"] == str(out.resolve()) and ex["n_cells"] == 28
    index = json.loads((out / "concept_map.json").read_text())
    tensors = load_file(str(out / "concept_map.safetensors"))
    assert index["format"] == "graft-concept-map/1" and index["top_k"] == 1
    truth = {d.name: d.dense().double() for d in adapter_deltas(resolve_adapter(planted_adapter))}
    for cell in index["cells"]:
        U, S, Vh = (tensors[cell["tensors"][k]].double() for k in ("U", "S", "Vh"))
        k = cell["k"]
        assert U.shape == (cell["shape"][0], k) and Vh.shape == (k, cell["shape"][1])
        u, s, vh = torch.linalg.svd(truth[cell["name"]], full_matrices=False)
        best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        assert torch.allclose(U @ torch.diag(S) @ Vh, best, atol=1e-5, rtol=1e-4), cell["name"]
    planted = [c for c in index["cells"] if c["name"] in PLANTED]
    assert all(c["k_energy_share"] > 0.6 for c in planted)
    # a concept map may be replaced; a folder holding anything else may not
    run_tool("cartography", adapter=planted_adapter, params={"export": str(out), "top_k": 2})
    assert json.loads((out / "concept_map.json").read_text())["top_k"] == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(GraftError) as e:
        run_tool("cartography", adapter=planted_adapter, params={"export": str(other)})
    assert "not empty" in _one_line(e) and (other / "keep.txt").read_text() == "mine"


# =============================================================================================
# hostile inputs: one line each
# =============================================================================================
def _copy_config(tiny_adapter, dst):
    dst.mkdir()
    shutil.copy(f"{tiny_adapter['path']}/adapter_config.json", dst / "adapter_config.json")
    return dst


def test_hostile_adapter_folders(tiny_adapter, tmp_path):
    cases = {}
    d = _copy_config(tiny_adapter, tmp_path / "no_weights")
    cases[d] = "no adapter_model.safetensors"
    d = _copy_config(tiny_adapter, tmp_path / "pickle")
    (d / "adapter_model.bin").write_bytes(b"\x80\x04garbage")
    cases[d] = "pickle"
    d = tmp_path / "truncated"
    shutil.copytree(tiny_adapter["path"], d)
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    cases[d] = "truncated"
    for name, text, what in [
        ("garbage", "not json {", "not valid JSON"),
        ("array", "[1, 2]", "not a JSON object"),
        ("ia3", json.dumps({"peft_type": "IA3"}), "not LoRA"),
        ("bad_r", json.dumps({"peft_type": "LORA", "r": "x"}), "'r' must be"),
        ("bad_pattern", json.dumps({"r": 4, "rank_pattern": {"(": 2}}), "invalid pattern"),
    ]:
        d = tmp_path / name
        shutil.copytree(tiny_adapter["path"], d)
        (d / "adapter_config.json").write_text(text)
        cases[d] = what
    d = tmp_path / "wrong_rank"
    shutil.copytree(tiny_adapter["path"], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 8
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    cases[d] = "does not match"
    d = (
        tmp_path / "alpha_overflow"
    )  # finite alpha whose scale overflows the factors (was an internal SVD error)
    shutil.copytree(tiny_adapter["path"], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 1e308
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    cases[d] = "past the float32 range"
    cases[tmp_path / "missing"] = "not found"
    for folder, what in cases.items():
        with pytest.raises(GraftError) as e:
            run_tool("cartography", adapter=str(folder))
        assert what in _one_line(e), (folder.name, str(e.value))


def test_full_model_folder_is_not_an_adapter(tmp_path):
    from engine.loading.tiny import build_tiny

    model, tok = build_tiny("tiny-llama-a")
    model.save_pretrained(str(tmp_path / "model"))
    with pytest.raises(GraftError) as e:
        resolve_adapter(str(tmp_path / "model"))
    assert "--donor with its --base" in _one_line(e)


def test_mismatched_base_and_pairs(tiny_adapter):
    with pytest.raises(GraftError) as e:
        run_tool("cartography", adapter=tiny_adapter["path"], base=ModelSpec.parse("tiny-gpt2-a"))
    assert "does not fit the base model" in _one_line(e)
    with pytest.raises(GraftError) as e:
        run_tool("spectrum", donor=ModelSpec.parse("tiny-gpt2-a"), base=ModelSpec.parse("tiny-llama-a"))
    assert "different architectures" in _one_line(e)
    with pytest.raises(GraftError) as e:
        run_tool("cartography", donor=ModelSpec.parse("tiny-llama-a"), base=ModelSpec.parse("tiny-llama-a"))
    assert "same model" in _one_line(e)
    with pytest.raises(GraftError) as e:
        run_tool("spectrum", adapter=tiny_adapter["path"], params={"modules": "attn.q,nothing.here"})
    assert "nothing.here" in _one_line(e)


def test_zero_update_is_reported_not_nan(tmp_path):
    from peft import LoraConfig, get_peft_model

    from engine.loading.tiny import build_tiny

    model, _ = build_tiny("tiny-llama-a")
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "a")
    )
    env = run_tool("cartography", adapter=str(tmp_path / "a"))
    r = env["result"]
    assert all(c["share"] is None and c["energy"] == 0.0 for c in r["cells"])
    assert any("zero" in w for w in r["warnings"])
    json.dumps(env, allow_nan=False)
    spec = run_tool("spectrum", adapter=str(tmp_path / "a"))
    assert spec["result"]["summary"]["median_k"] is None


# =============================================================================================
# CLI and figures
# =============================================================================================
@pytest.mark.parametrize("tool,key", [("cartography", "cells"), ("spectrum", "modules")])
def test_cli(tool, key, tiny_adapter, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            tool,
            "--adapter",
            tiny_adapter["path"],
            "--json",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    env = json.loads(out.read_text())
    direct = run_tool(tool, adapter=tiny_adapter["path"])
    assert env["result"] == json.loads(json.dumps(direct["result"]))
    rows = env["result"][key]
    need = (
        {"layer", "module", "kind", "energy", "share", "top_sv", "effective_rank"}
        if tool == "cartography"
        else {"name", "layer", "kind", "singular_values", "k_at_threshold"}
    )
    assert rows and need <= set(rows[0])


def test_figures(planted_adapter):
    go = pytest.importorskip("plotly.graph_objects")
    from viz import figure_for
    from viz.concept import cartography_figure, spectrum_figure

    cart = json.loads(json.dumps(run_tool("cartography", adapter=planted_adapter)))
    spec = json.loads(json.dumps(run_tool("spectrum", adapter=planted_adapter)))
    for metric in ("share", "energy", "top_sv", "effective_rank", "nonsense"):
        fig = cartography_figure(cart, metric=metric)
        heat = [t for t in fig.data if t.type == "heatmap"]
        assert len(heat) == 4 and sum(bool(t.visible) for t in heat) == 1
        fig.to_json()
    assert isinstance(figure_for("cartography", cart), go.Figure)
    fig = spectrum_figure(spec, modules=list(PLANTED))
    assert {t.name for t in fig.data if t.type == "scatter" and t.showlegend is not False} == set(PLANTED)
    figure_for("spectrum", spec).to_json()
    # empty results draw an empty figure, not an exception
    cartography_figure({"result": {}}).to_json()
    spectrum_figure({"result": {}}).to_json()
