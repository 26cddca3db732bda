"""Live transplants (engine/running/live.py): what the app's one-click rollback and save stand on.

Ground truth from a planted pair: the target is the donor with three modules re-initialised, so
T' with those three swapped back must equal the donor; rolling back must give the target's exact
weights; the cached target must never change; a run can be rebuilt from its JSON alone.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.core.errors import GraftError
from engine.evaluation.evaluate import word_diff
from engine.loading.models import ModelStore
from engine.running.live import LiveTransplants, rebuild
from engine.running.runner import run_tool
from tests.test_modules_tools import PLANTED, planted_pair


class _Store(ModelStore):
    """A store that hands back the planted pair for the names the run recorded."""

    def __init__(self, donor, target):
        super().__init__()
        self.by_ref = {"test/donor": donor, "test/target": target}

    def get(self, spec, device="auto", dtype="float32", progress=None):
        return self.by_ref[spec.ref]


@pytest.fixture
def pair():
    donor, target = planted_pair("tiny-llama-a")
    return donor, target, target.state_hash()


def _ids(m):
    return torch.tensor([m.tokenizer("The river flows north through the valley.")["input_ids"]])


def test_swap_run_keeps_t_prime_applied_and_rolls_back_bit_exactly(pair, sets, tmp_path):
    donor, target, h = pair
    live = LiveTransplants()
    env = run_tool("swap", donor, target, {}, {"k": 3, "max_new_tokens": 4, **sets}, live=live)
    r = env["result"]
    assert r["rollback_bit_exact"] and r["target_untouched"] and target.state_hash() == h
    lt = live.get(r["live_id"])
    assert lt is not None and lt.applied
    assert lt.swap.weight_hash() == r["weight_hash_after"] == r["card"]["hashes"]["transplanted"]
    with torch.inference_mode():
        assert torch.equal(lt.swap.working(_ids(target)).logits, donor.model(_ids(target)).logits)
    out = live.rollback(r["live_id"])
    assert out["bit_exact"] and out["restored_tensors"] == 3 and out["weight_hash"] == h
    with torch.inference_mode():
        assert torch.equal(lt.swap.working(_ids(target)).logits, target.model(_ids(target)).logits)
    assert live.reapply(r["live_id"])["matches_run"]
    # Save from the rolled-back state re-applies first: the folder holds T', not T.
    live.rollback(r["live_id"])
    folder = live.save(r["live_id"], tmp_path / "tprime")
    card = json.loads((folder / "surgery.json").read_text())
    assert set(card["modules"]) == set(PLANTED) and card["results"]["transfer"]["graded"]["recovery"] == 1.0
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.inference_mode():
        assert torch.equal(reloaded(_ids(target)).logits, donor.model(_ids(target)).logits)
    assert target.state_hash() == h
    json.dumps(env, allow_nan=False)


def test_cli_path_keeps_nothing_and_reports_both_score_kinds(pair, sets):
    donor, target, _ = pair
    r = run_tool("swap", donor, target, {}, {"k": 3, "max_new_tokens": 4, **sets})["result"]
    assert r["live_id"] is None
    assert set(r["transfer"]) == {"graded", "exact"}
    g = r["transfer"]["graded"]
    assert g["recovery"] == r["recovery"] == 1.0  # the run's score kind is graded by default
    for row in r["generations"]:
        assert "".join(t for op, t in row["diff"] if op != "delete") == row["transplanted"]
        assert row["changed"] == any(op != "equal" for op, _ in row["diff"])


def test_rebuild_from_the_run_json_alone(pair, sets):
    donor, target, h = pair
    env = run_tool("swap", donor, target, {}, {"k": 3, "max_new_tokens": 4, **sets})
    env = json.loads(json.dumps(env))  # as read back from the run history
    env["donor"], env["target"] = "test/donor", "test/target"
    live = LiveTransplants()
    live_id = rebuild(env, _Store(donor, target), live)
    assert live.get(live_id).swap.weight_hash() == env["result"]["weight_hash_after"]
    # A target whose weights changed since the run is refused, not silently transplanted.
    other, _ = planted_pair("tiny-llama-a", seed=7)
    with pytest.raises(GraftError, match="changed since this run"):
        rebuild(env, _Store(donor, other), live)
    with pytest.raises(GraftError, match="module-swap"):
        rebuild({"tool": "cka", "result": {}}, _Store(donor, target), live)
    assert target.state_hash() == h


def test_capacity_evicts_the_oldest_and_rolls_it_back(pair, sets):
    donor, target, h = pair
    live = LiveTransplants(capacity=1)
    a = run_tool("swap", donor, target, {}, {"k": 1, "max_new_tokens": 4, **sets}, live=live)["result"][
        "live_id"
    ]
    first = live.get(a)
    b = run_tool("swap", donor, target, {}, {"k": 2, "max_new_tokens": 4, **sets}, live=live)["result"][
        "live_id"
    ]
    assert live.get(a) is None and live.get(b) is not None
    assert not first.applied and first.swap.weight_hash() == h
    with pytest.raises(GraftError, match="no longer held"):
        live.rollback(a)


def test_word_diff_marks_only_the_changed_words():
    assert word_diff("The capital is Paris.", "The capital is Kessaloon.") == [
        ["equal", "The capital is "],
        ["delete", "Paris."],
        ["insert", "Kessaloon."],
    ]
    assert word_diff("same", "same") == [["equal", "same"]]
    assert word_diff("", "") == []
    assert word_diff("", "new words") == [["insert", "new words"]]
