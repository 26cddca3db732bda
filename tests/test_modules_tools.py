"""T7 rank-modules, T11 swap, T8 sweep-k on tiny models with planted ground truth.

A target is made from a tiny donor by re-initialising three chosen modules (seeded). The ranking
must put exactly those three on top; swapping them back must reproduce the donor (identical
logits, Recovery = 1); the cached target must never change.
"""

import json

import pytest
import torch

from engine.core.errors import Cancelled, GraftError
from engine.core.progress import Progress
from engine.loading.models import ModelSpec, load_model
from engine.running.registry import get_tool
from engine.running.runner import run_tool
from engine.surgery.transplant import ModuleSwap
from engine.tools.sweep import default_k_grid, parse_k_grid

PLANTED = ("blocks.1.mlp.down", "blocks.2.attn.o", "blocks.3.mlp.down")


def planted_pair(name: str, seed: int = 123):
    """(donor, target): the target is the donor with PLANTED re-initialised (same init scale)."""
    donor = load_model(ModelSpec.parse(name), "cpu")
    target = load_model(ModelSpec.parse(name), "cpu")
    lin = {m.name: m for m in target.arch.linear_modules()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in PLANTED:
            w = target.arch.module(lin[n].path).weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    return donor, target


@pytest.fixture(scope="module", params=["tiny-llama-a", "tiny-gpt2-a"])
def planted(request, sets, workload_texts):
    donor, target = planted_pair(request.param)
    h = target.state_hash()
    opts = {"workload": workload_texts}
    rank = run_tool("rank-modules", donor, target, opts, {"top_decile": 0.19})  # top group >= 3 modules
    swap = run_tool("swap", donor, target, opts, {"k": 3, "max_new_tokens": 4, **sets})
    sweep = run_tool("sweep-k", donor, target, opts, {"k_grid": "0,1,3,100", "max_new_tokens": 4, **sets})
    return {"donor": donor, "target": target, "hash": h, "rank": rank, "swap": swap, "sweep": sweep}


@pytest.fixture(scope="module")
def workload_texts(tmp_path_factory):
    p = tmp_path_factory.mktemp("wl") / "workload.txt"
    p.write_text(
        "\n".join(
            [
                "The quick brown fox jumps over the lazy dog.",
                "Water boils at one hundred degrees Celsius at sea level.",
                "Paris is the capital of France, and Berlin is the capital of Germany.",
                "The library opens at nine in the morning on weekdays.",
                "Light travels faster than sound, so we see lightning first.",
                "Mountains and rivers shape where people choose to live.",
            ]
        )
        + "\n"
    )
    return str(p)


def test_ranking_finds_the_planted_modules(planted):
    r = planted["rank"]["result"]
    top = [m["name"] for m in r["modules"][:3]]
    assert set(top) == set(PLANTED)
    scores = [m["score"] for m in r["modules"]]
    assert scores == sorted(scores, reverse=True)
    # The planted modules are in (nearly) every text's top group.
    assert r["top_decile_size"] >= 3
    assert min(m["consistency"] for m in r["modules"][:3]) >= 5 / 6
    assert r["n_attention"] + r["n_mlp"] == r["n_modules"] == len(r["modules"])
    assert r["alignment"] == "token" and r["n_tokens"] > 0
    assert len(r["strip"]) == len(r["strip_rows"]) and all(
        len(row) == len(r["strip_layers"]) for row in r["strip"]
    )
    json.dumps(planted["rank"], allow_nan=False)


def test_swapping_the_planted_modules_back_recovers_the_donor(planted):
    r = planted["swap"]["result"]
    assert {m["name"] for m in r["modules"]} == set(PLANTED) and r["selection"] == "top-k"
    assert r["recovery"] == 1.0 and r["recovery_status"] == "ok"
    assert r["after"] == r["donor"]  # T' is the donor, state for state
    assert r["after"]["task_score"] == r["donor"]["task_score"]
    assert r["alignment_after"] == 1.0
    assert r["rollback_bit_exact"] and r["target_untouched"]
    assert r["weight_hash_before"] == planted["hash"] != r["weight_hash_after"]
    assert r["weight_hash_after"] == planted["donor"].state_hash()
    assert len(r["generations"]) == r["n_test_items"] == 2
    assert r["saved_to"] is None
    json.dumps(planted["swap"], allow_nan=False)
    # The same swap by hand: logits of T' equal the donor's exactly.
    donor, target = planted["donor"], planted["target"]
    swap = ModuleSwap(target, donor, [m["name"] for m in r["modules"]])
    swap.apply()
    ids = torch.tensor([target.tokenizer("The river flows north through the valley.")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(swap.working(ids).logits, donor.model(ids).logits)
        assert not torch.equal(target.model(ids).logits, donor.model(ids).logits)
    swap.rollback()
    assert target.state_hash() == planted["hash"]


def test_sweep_reaches_recovery_one_at_the_planted_k(planted):
    r = planted["sweep"]["result"]
    n = r["n_swappable"]
    assert [p["k"] for p in r["points"]] == [0, 1, 3, n] and r["k_clipped"] == [100]
    by_k = {p["k"]: p for p in r["points"]}
    assert by_k[0]["tir"] == 1.0 and by_k[0]["recovery"] == 0.0 and by_k[0]["attention_share"] is None
    assert by_k[3]["recovery"] == 1.0 and by_k[n]["recovery"] == 1.0
    assert by_k[3]["task_score"] == r["donor"]["task_score"]
    assert by_k[3]["n_attention"] + by_k[3]["n_mlp"] == 3
    assert by_k[3]["attention_share"] + by_k[3]["mlp_share"] == pytest.approx(1.0)
    assert by_k[3]["attention_share"] == pytest.approx(1 / 3)  # one of the three planted is attention
    assert r["rollback_bit_exact"] and r["target_untouched"]
    assert planted["target"].state_hash() == planted["hash"]
    json.dumps(planted["sweep"], allow_nan=False)


def test_figures_render_from_json(planted):
    go = pytest.importorskip("plotly.graph_objects")
    from viz import figure_for

    for tool in ("rank", "swap", "sweep"):
        env = json.loads(json.dumps(planted[tool]))
        fig = figure_for(env["tool"], env)
        assert isinstance(fig, go.Figure) and len(fig.data) > 0
        fig.to_json()


def test_undefined_tir_and_recovery_are_null_with_a_note(sets):
    donor, target = planted_pair("tiny-llama-a")
    # Random tiny models never answer correctly: S(T) = S(D) = 0 with the exact score.
    env = run_tool("swap", donor, target, {}, {"k": 2, "score": "exact", "max_new_tokens": 4, **sets})
    r = json.loads(json.dumps(env, allow_nan=False))["result"]
    assert r["before"]["task_score"] == 0.0
    assert r["tir"] is None and r["tir_status"] == "undefined" and "S(T) = 0" in r["tir_note"]
    assert (
        r["recovery"] is None and r["recovery_status"] == "undefined" and "S(D) = S(T)" in r["recovery_note"]
    )
    # Donor = target (one shared object): S(D) = S(T) > 0 with the graded score.
    env = run_tool(
        "swap",
        target,
        target,
        {},
        {"modules": "blocks.0.attn.q, blocks.1.mlp.up", "max_new_tokens": 4, **sets},
    )
    r = json.loads(json.dumps(env, allow_nan=False))["result"]
    assert r["selection"] == "explicit" and [m["name"] for m in r["modules"]] == [
        "blocks.0.attn.q",
        "blocks.1.mlp.up",
    ]
    assert r["tir"] == 1.0 and r["recovery"] is None and r["recovery_note"]
    assert r["weight_hash_after"] == r["weight_hash_before"]


def test_swap_saves_a_reloadable_transplant(sets, tmp_path):
    from transformers import AutoModelForCausalLM

    donor, target = planted_pair("tiny-gpt2-a")
    out = tmp_path / "tprime"
    env = run_tool("swap", donor, target, {}, {"k": 3, "max_new_tokens": 4, "save": str(out), **sets})
    r = env["result"]
    assert r["saved_to"] == str(out.resolve())
    card = json.loads((out / "surgery.json").read_text())
    assert card["operation"] == "module-swap" and set(card["modules"]) == set(PLANTED)
    assert card["hashes"]["transplanted"] == r["weight_hash_after"] and card["results"]["recovery"] == 1.0
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor([target.tokenizer("Paris is the capital of France.")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, donor.model(ids).logits)


def test_cross_family_and_bad_params_are_refused(sets):
    for tool in ("rank-modules", "swap", "sweep-k"):
        assert get_tool(tool).same_family and get_tool(tool).page == "Transplant"
        with pytest.raises(GraftError, match="same family with the same tokenizer"):
            run_tool(tool, ModelSpec.parse("tiny-gpt2-a"), ModelSpec.parse("tiny-llama-b"), {})
    donor, target = planted_pair("tiny-llama-a")
    with pytest.raises(GraftError, match="not a linear module"):
        run_tool("swap", donor, target, {}, {"modules": "blocks.0.attn.qkv", **sets})
    with pytest.raises(GraftError, match="k-grid"):
        run_tool("sweep-k", donor, target, {}, {"k_grid": "1,x", **sets})


def test_k_grid_parsing():
    assert default_k_grid(16) == [0, 1, 2, 4, 8, 16]
    assert default_k_grid(28) == [0, 1, 2, 4, 8, 16, 28]
    assert default_k_grid(1) == [0, 1]
    assert parse_k_grid("", 5) == ([0, 1, 2, 4, 5], [])
    assert parse_k_grid("8, 0,2,2,40", 16) == ([0, 2, 8, 16], [40])
    with pytest.raises(GraftError):
        parse_k_grid("-1", 4)
    with pytest.raises(GraftError):
        parse_k_grid(" , ", 4)


def test_sweep_can_be_cancelled_between_k_values(sets):
    donor, target = planted_pair("tiny-llama-a")
    h = target.state_hash()
    p = Progress(lambda f, m: p.cancel() if m.startswith("K = 1:") else None)
    with pytest.raises(Cancelled):
        run_tool("sweep-k", donor, target, {}, {"k_grid": "0,1,2", "max_new_tokens": 4, **sets}, progress=p)
    assert target.state_hash() == h
