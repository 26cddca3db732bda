"""Pre-surgery go / no-go (engine/evaluation/gonogo.py, tool ``go-no-go``), on pairs whose answer is known
by construction:

* a model against itself: every operation is go, a direct organ is plausible at p = s, the
  conjugation maps are identities (a plain merge is enough);
* a cross-family pair: module swap is no-go with T1's reason;
* a rotated twin (engine/surgery/twin.py: same function, residual stream h' = h Q): shapes are equal, so
  T1 allows a swap, but the coordinates differ: module swap no-go, direct organ no-go (bridged
  go), conjugation go with fitted maps and a plain merge not advised;
* a donor with two planted modules: swap is go and the suggested K holds both.
"""

import json

import pytest
import torch

from engine.core.errors import GraftError
from engine.loading.arch import ArchAdapter
from engine.loading.models import LoadedModel, ModelSpec
from engine.loading.tiny import build_tiny
from engine.running.runner import run_tool
from engine.surgery.twin import rotate_model


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _loaded(model, tok, name: str) -> LoadedModel:
    return LoadedModel(
        ModelSpec("builtin", name), model, tok, ArchAdapter(model), torch.device("cpu"), torch.float32, ""
    )


def _ops(env: dict) -> dict:
    return {o["operation"]: o for o in env["result"]["operations"]}


@pytest.fixture(scope="module")
def base():
    model, tok = build_tiny("tiny-llama-a")
    return _loaded(model, tok, "tiny-llama-a")


def test_model_against_itself_is_go_everywhere(base, workload):
    env = run_tool("go-no-go", base, base, options={"workload": workload})
    json.dumps(env, allow_nan=False)
    ops = _ops(env)
    assert all(o["go"] for o in ops.values()), [o["reasons"] for o in ops.values()]
    assert env["result"]["viable"] == ["module_swap", "organ", "conjugation"]
    assert env["result"]["recommendation"].startswith("go:")
    organ = ops["organ"]["settings"]
    assert organ["mode"] == "direct"
    assert (
        organ["positions"][0] == organ["organ_start"] and organ["epsilon"][0] < 1e-3
    )  # the organ's own place
    conj = ops["conjugation"]["settings"]
    assert conj["plain_merge_advised"] and {l["map"] for l in conj["layers"]} == {"identity"}
    assert (
        ops["module_swap"]["settings"]["score_share"] is None
    )  # nothing differs: any K is a no-op, and it says so
    assert any("no-op" in r for r in ops["module_swap"]["reasons"])
    assert {"T1", "T2", "T3", "T4", "T7"} <= set(env["result"]["tools_run"])


def test_cross_family_pair_refuses_module_swap_with_t1_reason(workload):
    env = run_tool(
        "go-no-go",
        ModelSpec.parse("tiny-gpt2-a"),
        ModelSpec.parse("tiny-llama-b"),
        options={"workload": workload},
    )
    ops = _ops(env)
    swap = ops["module_swap"]
    assert not swap["go"] and swap["verdict"] == "no-go"
    assert swap["reasons"][0].startswith("T1: different families")
    assert not ops["organ"]["go"] and ops["organ"]["reasons"][0].startswith("T1: block internals differ")
    assert "T7" not in env["result"]["tools_run"]  # no ranking where no swap is possible


def test_rotated_twin_needs_conjugation_not_a_plain_merge(base, workload):
    twin_model, _ = rotate_model(base.model, seed=7)
    twin = _loaded(twin_model, base.tokenizer, "tiny-llama-a-twin")
    env = run_tool("go-no-go", base, twin, options={"workload": workload})
    ops = _ops(env)
    checks = env["result"]["checks"]
    assert checks["verdicts_t1"]["module_swap"]  # equal shapes: T1 alone would allow the swap
    swap = ops["module_swap"]
    assert (
        not swap["go"] and "other coordinates" in swap["reasons"][0] and "conjugation" in swap["reasons"][0]
    )
    conj = ops["conjugation"]
    assert (
        conj["go"] and conj["settings"]["plain_merge_advised"] is False and conj["settings"]["map"] == "auto"
    )
    assert "plain merge not advised" in conj["reasons"][0]
    assert "identity" not in {l["map"] for l in conj["settings"]["layers"]}
    assert conj["settings"]["mean_map_alignment"] > 0.95  # a rotation explains the twin
    organ = ops["organ"]
    assert organ["go"] and organ["settings"]["mode"] == "bridged"
    assert env["result"]["viable"] == ["organ", "conjugation"]


def test_planted_modules_make_the_suggested_k(base, workload):
    model, tok = build_tiny("tiny-llama-a")
    planted = ("model.layers.2.mlp.down_proj", "model.layers.3.self_attn.o_proj")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in planted:
            w = model.get_submodule(name).weight
            w.add_(torch.randn(w.shape, generator=gen) * w.std() * 3)
    donor = _loaded(model, tok, "tiny-llama-a-planted")
    env = run_tool("go-no-go", donor, base, options={"workload": workload}, params={"swap_mass": 0.5})
    swap = _ops(env)["module_swap"]
    assert swap["go"], swap["reasons"]
    # the two planted modules hold over half of T7's activation difference, so K = 2, exactly them
    assert swap["settings"]["k"] == 2 and swap["settings"]["score_share"] >= 0.5
    ranked = run_tool("rank-modules", donor, base, options={"workload": workload})["result"]["modules"]
    assert {m["name"] for m in ranked[:2]} == {"blocks.2.mlp.down", "blocks.3.attn.o"}


def test_adapter_gives_conjugation_rank_from_t6(base, workload, tiny_adapter):
    env = run_tool(
        "go-no-go",
        base,
        base,
        options={"workload": workload},
        params={"adapter": tiny_adapter["path"], "rank_energy": 0.99},
    )
    conj = _ops(env)["conjugation"]
    assert {"T5", "T6"} <= set(env["result"]["tools_run"])
    spec = run_tool("spectrum", adapter=tiny_adapter["path"], params={"threshold": 0.99})["result"]["summary"]
    assert conj["settings"]["k_median"] == spec["median_k"] and conj["settings"]["k_max"] == spec["max_k"]
    assert 1 <= conj["settings"]["k_max"] <= 4  # rank-4 adapter


def test_thresholds_decide(base, workload):
    twin_model, _ = rotate_model(base.model, seed=7)
    twin = _loaded(twin_model, base.tokenizer, "tiny-llama-a-twin")
    # with a threshold above any identity residual, the twin would count as the same coordinates
    env = run_tool("go-no-go", base, twin, options={"workload": workload}, params={"identity_max": 10.0})
    assert _ops(env)["module_swap"]["go"]
    env = run_tool("go-no-go", base, base, options={"workload": workload}, params={"epsilon_direct": 0.0})
    assert _ops(env)["organ"]["settings"]["mode"] == "bridged"  # 0 < 0 never holds: direct is not claimed


def test_bad_adapter_is_one_line(base, workload, tmp_path):
    with pytest.raises(GraftError, match="adapter not found"):
        run_tool(
            "go-no-go", base, base, options={"workload": workload}, params={"adapter": str(tmp_path / "nope")}
        )


def test_page_runs_go_no_go_and_shows_every_operation(home):
    from tests.test_app import has_chart, open_app, run_until, texts

    at = open_app("pages/gonogo.py")
    assert not at.exception and at.title[0].value == "Go / no-go"
    at.button(key="run-go-no-go").click().run()
    run_until(at, has_chart, timeout=120)
    assert not at.exception, [e.value for e in at.exception]
    # What the page shows is what the run computed: its recorded envelope, line for line.
    from engine.running.history import History

    hist = History()
    run = next(r for r in hist.list() if r["tool"] == "go-no-go" and r["status"] == "done")
    result = hist.get(run["id"])["result"]["result"]
    shown = texts(at.success) + texts(at.error)
    assert shown == result["recommendation"] and shown.startswith(("go:", "no-go:"))
    assert (len(at.success) == 1) == result["recommendation"].startswith("go")
    body = texts(at.markdown)
    ops = result["operations"]
    assert [op["title"] for op in ops] == ["Module swap", "Organ transplant", "Rank-k conjugation"]
    for op in ops:
        assert f"**{op['title']}** {':green-badge[go]' if op['go'] else ':red-badge[no-go]'}" in body
