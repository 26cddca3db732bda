"""Organ insertion strategies (engine/running/organ_run.py): what each one trains, the shared
optimiser (engine/surgery/train_config.py), the control arm, T9's seeds, and runs recorded under
the old parameters."""

from __future__ import annotations

import math

import pytest

from engine.core.errors import GraftError
from engine.core.train_config import TrainConfig
from engine.loading.models import ModelSpec, ModelStore
from engine.running.organ_run import legacy_params
from engine.running.runner import run_tool

TARGET = ModelSpec.parse("tiny-gpt2-b")


@pytest.fixture(scope="module")
def store():
    return ModelStore()


def _insert(store, tiny_organ, sets, workload, **params):
    return run_tool(
        "organ-insert",
        target=TARGET,
        organ=tiny_organ["path"],
        store=store,
        options={"workload": workload},
        params={"position": 0, **sets, **params},
    )["result"]


def test_train_config_schedule_and_epochs():
    cfg = TrainConfig(epochs=2, lr=1e-3, warmup=0.25, batch_size=4)
    assert cfg.per_epoch(10) == 3 and cfg.total_steps(10) == 6 and cfg.warmup_steps(6) == 2
    lrs = [cfg.lr_at(t, 6) for t in range(6)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)  # linear warm-up to the peak
    assert lrs[2] == lrs[1] and all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.2e-3  # cosine
    batches = list(cfg.batches(10, seed=0))
    assert len(batches) == 6 and sorted(i for b in batches[:3] for i in b) == list(range(10))  # an epoch
    assert batches == list(cfg.batches(10, seed=0)) and batches != list(cfg.batches(10, seed=1))
    assert TrainConfig(steps=5).total_steps(1000) == 5
    with pytest.raises(GraftError):
        TrainConfig(epochs=0).check()


def test_each_strategy_trains_what_it_says(store, tiny_organ, sets, workload, one_thread):
    n_texts = 10  # the workload fixture's texts
    per_epoch = math.ceil(n_texts / 8)
    r = _insert(store, tiny_organ, sets, workload, strategy="direct")
    assert r["recovery_losses"] == [] and r["bridge_losses"] == [] and r["bridge"] is None
    r = _insert(store, tiny_organ, sets, workload, strategy="direct+recovery", recovery_epochs=2)
    assert len(r["recovery_losses"]) == 2 * per_epoch and r["bridge_losses"] == []
    assert r["card"]["parameters"]["training"]["recovery"]["optimizer"] == "AdamW"
    r = _insert(store, tiny_organ, sets, workload, strategy="bridged", bridge_epochs=1, joint_epochs=2)
    assert len(r["bridge_losses"]) == per_epoch and len(r["recovery_losses"]) == 2 * per_epoch
    assert r["bridge"] == "trained (from the identity)" and r["bridge_deviation"]["in"] > 0
    r = _insert(store, tiny_organ, sets, workload, strategy="bridged-closed-form")
    assert r["bridge"] == "closed-form (training-free)" and r["recovery_losses"] == []
    assert "training-free" in r["card"]["parameters"]["strategy_means"]


def test_the_control_transplants_nothing(store, tiny_organ, sets, workload, one_thread):
    """The control puts the target's own blocks back: untrained, T' is T; trained, it is T fine-tuned
    in place, which differs from the organ's recovery."""
    r = _insert(store, tiny_organ, sets, workload, strategy="control", recovery_epochs=0)
    assert r["after"] == r["before"] and r["weight_hash_after"] == r["weight_hash_before"]
    c = _insert(store, tiny_organ, sets, workload, strategy="control", recovery_epochs=1)
    d = _insert(store, tiny_organ, sets, workload, strategy="direct+recovery", recovery_epochs=1)
    assert c["after"] != c["before"] and c["after"] != d["after"] and c["rollback_bit_exact"]


def test_t9_reports_a_mean_and_spread_over_seeds(store, tiny_organ, sets, workload, one_thread):
    def sweep(**params):
        return run_tool(
            "position-sweep",
            target=TARGET,
            organ=tiny_organ["path"],
            store=store,
            options={"workload": workload},
            params={"positions": "0", "epsilon": False, **sets, **params},
        )["result"]["points"]

    (pt,) = sweep(strategy="direct+recovery", recovery_epochs=1, lr=1e-2, seeds=2)
    runs = pt["per_seed"]
    assert len(runs) == 2 and runs[0] != runs[1]  # seeds order the batches differently
    for k in ("ppl_concept", "ppl_retained"):
        assert pt[k] == pytest.approx((runs[0][k] + runs[1][k]) / 2, rel=1e-5)
        assert pt["spread"][k] == pytest.approx(abs(runs[0][k] - runs[1][k]) / math.sqrt(2), rel=1e-4)
    assert "per_seed" not in sweep(strategy="direct", seeds=3)[0]  # nothing trained: one run


def test_runs_recorded_with_the_old_parameters_map_to_strategies():
    assert legacy_params({"mode": "direct", "recovery_steps": 0})["strategy"] == "direct"
    assert legacy_params({"mode": "direct", "recovery_steps": 5})["strategy"] == "direct+recovery"
    assert legacy_params({"mode": "bridged", "bridge": "closed-form"})["strategy"] == "bridged-closed-form"
    assert legacy_params({"mode": "bridged", "bridge": "trained", "lr": 1e-3}) == {
        "strategy": "bridged",
        "lr": 1e-3,
    }
    assert legacy_params({"strategy": "bridged"}) == {"strategy": "bridged"}
