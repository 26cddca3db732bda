"""Model Surgery ground truth at real scale (SmolLM2-135M and the demo donor's LoRA adapter):

* same coordinates: conjugating the adapter into its own base uses identity maps everywhere and
  gives exactly the plain merged LoRA (max |dW| difference <= 1e-6) and the donor's task score;
* rotated twin: a plain merge into a function-preserving rotated twin of the base does not carry
  the concept; conjugation does (graded Recovery >= 0.9).
"""

from __future__ import annotations

import pytest

from engine.loading.models import DEMO_DONOR, SMOLLM2, ModelSpec, ModelStore, demo_donor_dir
from engine.running.runner import run_tool

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def store():
    return ModelStore()


def test_same_coordinates_equals_the_merged_lora_and_the_donor(tmp_path, store):
    from safetensors.torch import load_file

    out = tmp_path / "same"
    env = run_tool(
        "conjugate",
        target=ModelSpec.parse(SMOLLM2),
        base=ModelSpec.parse(SMOLLM2),
        adapter=DEMO_DONOR,
        params={"save": str(out)},
        store=store,
    )
    r = env["result"]
    counts = r["map_counts"]
    assert counts["input"]["identity"] == counts["output"]["identity"] == r["n_conjugated"] == 210
    assert not r["rolled_back"] and r["saved_to"]
    # The saved T' against the demo donor's own merged weights (peft's merge_and_unload).
    ours = load_file(str(out / "model.safetensors"))
    merged = load_file(str(demo_donor_dir() / "merged" / "model.safetensors"))
    common = [k for k in ours if k in merged]
    assert len(common) >= 200
    worst = max(float((ours[k].float() - merged[k].float()).abs().max()) for k in common)
    assert worst <= 1e-6, worst
    # ... and the donor's task score: T' and D are the same model.
    assert r["after"]["task_score_exact"] == r["donor"]["task_score_exact"]
    assert abs(r["after"]["task_score_graded"] - r["donor"]["task_score_graded"]) < 1e-4
    assert r["transfer"]["graded"]["recovery"] == pytest.approx(1.0, abs=1e-3)


def test_rotated_twin_plain_merge_fails_and_conjugation_carries(tmp_path, store):
    from engine.surgery.twin import make_twin

    base = store.get(ModelSpec.parse(SMOLLM2), "cpu", "float32")
    twin_dir = tmp_path / "twin"
    card = make_twin(base, 7, twin_dir)
    assert (
        card["verification"]["ok"] and card["verification"]["rel_diff"] < 1e-4
    )  # same function, other coordinates
    twin = ModelSpec.parse(str(twin_dir))
    common = {"concept": "", "retained": "", "score": "graded"}
    conj = run_tool(
        "conjugate",
        target=twin,
        base=ModelSpec.parse(SMOLLM2),
        adapter=DEMO_DONOR,
        params=common,
        store=store,
    )["result"]
    plain = run_tool(
        "conjugate",
        target=twin,
        base=ModelSpec.parse(SMOLLM2),
        adapter=DEMO_DONOR,
        params={**common, "map": "identity", "max_retained_increase": -1},
        store=store,
    )["result"]
    assert conj["before"] == plain["before"]  # the same twin T in both runs
    assert conj["transfer"]["graded"]["recovery"] >= 0.9, conj["transfer"]
    assert plain["transfer"]["graded"]["recovery"] < 0.3, plain["transfer"]
    # Conjugation had to find the rotation: not everything can be identity.
    assert conj["map_counts"]["output"]["procrustes"] + conj["map_counts"]["output"]["ridge"] > 0
    assert conj["map_counts"]["input"]["ridge"] + conj["map_counts"]["input"]["procrustes"] > 0
