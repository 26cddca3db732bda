"""Real-model tests on the built-in SmolLM2-135M-Instruct and its demo donor (marked; run in CI)."""

import pytest

from engine.loading.builtins import DEMO_DONOR, SMOLLM2, builtin_status
from engine.loading.gguf import smollm2_gguf
from engine.loading.models import ModelSpec, ModelStore
from engine.running.runner import run_tool

pytestmark = pytest.mark.real

STORE = ModelStore()


@pytest.fixture(scope="module")
def smol():
    return STORE.get(ModelSpec.parse(SMOLLM2), "cpu")


def test_smollm2_loads_from_the_safetensors_cache(smol):
    assert builtin_status()[SMOLLM2]["state"] == "ready"
    assert smol.arch.family == "llama" and smol.arch.n_layers == 30 and smol.arch.hidden_size == 576
    mods = smol.arch.linear_modules()
    assert len(mods) == 30 * 7
    assert smol.tokenizer.chat_template


def test_gguf_file_resolves():
    spec = ModelSpec.parse(str(smollm2_gguf()))
    assert spec.kind == "gguf"


def test_smollm2_against_itself(smol):
    opts = {"max_tokens": 1024}
    cka = run_tool("cka", smol, smol, opts)["result"]
    assert cka["alignment"] == "token"
    assert min(cka["diagonal"]) > 0.999999
    assert cka["matching"] == [[i, i] for i in range(30)]
    pro = run_tool("procrustes", smol, smol, opts)["result"]
    assert pro["n_fit"] > 576  # enough rows to determine a 576 x 576 map
    assert max(l["residual_heldout"] for l in pro["layers"]) < 1e-3
    br = run_tool("bridge-check", smol, smol, opts)["result"]
    assert all(br["epsilon_raw"][s][s] < 1e-6 for s in range(30))


def test_demo_donor_against_smollm2(smol):
    donor = STORE.get(ModelSpec.parse(DEMO_DONOR), "cpu")
    assert donor.state_hash() != smol.state_hash()
    compat = run_tool("compat", donor, smol, {"max_tokens": 512})["result"]
    assert all(compat["verdicts"].values()), compat["reasons"]
    assert compat["signature"]["equal"] and compat["swappable_modules"] == 210
    cka = run_tool("cka", donor, smol, {"max_tokens": 1024})["result"]
    # SmolLM2's attention-sink tokens (~100x the median norm) are left out, else every layer looks alike
    assert cka["n_outlier_rows"] > 0
    # a LoRA fine-tune moves representations only slightly: the matching stays near the diagonal
    assert max(abs(i - j) for i, j in cka["matching"]) <= 4
    assert sum(i == j for i, j in cka["matching"]) >= 18


def test_module_swap_smollm2_with_its_demo_donor(smol):
    """T11 on the real pair: T' moves toward D on the held-out questions, rollback is bit-exact."""
    donor = STORE.get(ModelSpec.parse(DEMO_DONOR), "cpu")
    h = smol.state_hash()
    r = run_tool("swap", donor, smol, {"max_tokens": 512}, {"k": 64, "max_new_tokens": 12})["result"]
    assert r["rollback_bit_exact"] and r["target_untouched"] and smol.state_hash() == h
    assert (
        r["n_swappable"] == 210 and len(r["modules"]) == 64 and r["n_test_items"] == len(r["generations"]) > 0
    )
    # the donor learned the concept: lower concept perplexity and a higher graded score than the target
    assert r["donor"]["ppl_concept"] < r["before"]["ppl_concept"]
    assert r["donor"]["task_score_graded"] > r["before"]["task_score_graded"]
    # swapping the 64 most different modules moves T' part of the way, in the donor's direction
    assert r["before"]["ppl_concept"] > r["after"]["ppl_concept"] > r["donor"]["ppl_concept"]
    g = r["transfer"]["graded"]
    assert g["recovery"] is not None and 0.0 < g["recovery"] < 1.0
    assert r["alignment_after"] > r["alignment_before"]
