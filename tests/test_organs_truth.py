"""Ground truth for the organ tools, run through the tools themselves (``run_tool``), not only their
helpers.

* T10 on a planted rotation: the target is the organ's source model rotated, ``h_T = h_S Q`` (the
  rotated twin, function-preserving). Inserted at its own position, the organ needs ``W_in = Q^T``
  and ``W_out = Q``, so the closed-form bridges must deviate from the identity by exactly
  ``||Q - I||_F`` on both sides; on the unrotated source they must not deviate at all.
* Trained bridges start where the tool says they start: from the closed form (``closed-form+trained``)
  or from the identity (``trained``), and Adam moves each weight by about ``lr`` per step, so after
  ``n`` steps they lie within ``n * lr * d`` (Frobenius) of that start. (LM-loss training does not
  recover a planted rotation on a random tiny model: measured, the bridges move away from ``Q^T``
  while the loss falls, so the start and the step bound are what can be checked exactly.)
* Standalone organ training: an organ holding every block of its source is the source, so its
  standalone perplexity before training must equal the source's own perplexity, computed by the
  evaluation code (another code path). Training changes only the organ.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from engine.loading.arch import ArchAdapter
from engine.loading.models import ModelSpec, load_model
from engine.running.runner import run_tool
from engine.surgery.organ import extract_organ, load_organ, save_organ
from engine.surgery.twin import rotate_model


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """tiny-llama-a, its rotated twin and the rotation Q, an organ of its blocks 1..3, 40 texts."""
    d = tmp_path_factory.mktemp("planted")
    base = load_model(ModelSpec.parse("tiny-llama-a"), "cpu")
    twin_model, q = rotate_model(base.model, seed=3)
    twin = dataclasses.replace(
        base, model=twin_model, arch=ArchAdapter(twin_model), spec=ModelSpec("path", str(d / "twin"))
    )
    organ = extract_organ(base)
    save_organ(organ, d / "organ")
    texts = [
        "The river flows north through the valley and into the cold sea.",
        "An orchestra played a symphony in four movements last night.",
        "Water boils at one hundred degrees at sea level.",
        "The quick brown fox jumps over the lazy dog.",
    ] * 10
    wl = d / "texts.txt"
    wl.write_text("\n".join(f"{t} ({i})" for i, t in enumerate(texts)))
    truth = float(torch.linalg.matrix_norm(q.double() - torch.eye(q.shape[0], dtype=torch.float64)))
    return {
        "base": base,
        "twin": twin,
        "organ": str(d / "organ"),
        "s": organ.input_layer,
        "workload": str(wl),
        "truth": truth,
        "d": q.shape[0],
    }


def _t10(planted, target, **params):
    env = run_tool(
        "bridge-deviation",
        target=target,
        organ=planted["organ"],
        options={"workload": planted["workload"]},
        params={"positions": str(planted["s"]), **params},
    )
    return env["result"]["points"]


def test_t10_closed_form_bridges_recover_a_planted_rotation(planted):
    truth = planted["truth"]
    assert truth > 5  # a random rotation of width 64 is far from the identity
    (pt,) = _t10(planted, planted["twin"], ridge_alpha=1e-8, train_steps=0)
    assert pt["bridge"] == "closed-form" and pt["position"] == planted["s"]
    assert pt["dev_in"] == pytest.approx(truth, rel=1e-4) and pt["dev_out"] == pytest.approx(truth, rel=1e-4)
    (same,) = _t10(planted, planted["base"], ridge_alpha=1e-8, train_steps=0)
    assert same["dev_in"] == pytest.approx(0, abs=1e-4) and same["dev_out"] == pytest.approx(0, abs=1e-4)


def test_t10_trained_bridges_start_at_the_identity_and_move_by_adams_step(planted):
    """Through T10: trained bridges start at the identity, and 5 Adam steps of lr 1e-4 move a
    64 x 64 map by about 5 * 1e-4 * 64 at most."""
    steps, lr, d = 5, 1e-4, planted["d"]
    points = _t10(planted, planted["twin"], ridge_alpha=1e-8, train_steps=steps, lr=lr, subsets="1")
    (trained,) = [p for p in points if p["bridge"] == "trained"]
    assert trained["n_texts"] == 40
    for side in ("dev_in", "dev_out"):
        assert 0 < trained[side] <= 1.5 * steps * lr * d, (side, trained[side])


def test_closed_form_then_trained_bridges_start_at_the_planted_rotation(planted):
    """Through organ-insert: closed-form+trained starts at the recovered rotation and drifts by
    Adam's step at most; the bridged twin then computes what the source computes."""
    steps, lr, d = 5, 1e-4, planted["d"]
    sets = {"concept": "", "retained": ""}
    env = run_tool(
        "organ-insert",
        target=planted["twin"],
        organ=planted["organ"],
        options={"workload": planted["workload"]},
        params={
            "position": planted["s"],
            "mode": "bridged",
            "bridge": "closed-form+trained",
            "bridge_steps": steps,
            "lr": lr,
            "ridge_alpha": 1e-8,
            "max_new_tokens": 2,
            **sets,
        },
    )
    dev = env["result"]["bridge_deviation"]
    for side in ("in", "out"):
        assert abs(dev[side] - planted["truth"]) <= 1.5 * steps * lr * d, (side, dev[side], planted["truth"])


def test_t10_trains_on_the_subsets_it_names(planted):
    points = _t10(planted, planted["base"], train_steps=1, subsets="0.25,0.5,1")
    assert [(p["bridge"], p["n_texts"]) for p in points] == [
        ("closed-form", 40),
        ("trained", 10),
        ("trained", 20),
        ("trained", 40),
    ]


def test_a_full_stack_organ_standalone_is_its_source(planted, tmp_path):
    """An organ of every block, between its source's own embeddings and head, is the source: its
    standalone perplexity before training equals the source's perplexity (evaluation's code)."""
    from engine.evaluation.evaluate import perplexity

    base = planted["base"]
    full = extract_organ(base, start=0, size=base.arch.n_layers)
    save_organ(full, tmp_path / "full")
    texts = tmp_path / "t.txt"
    lines = [json.dumps(t)[1:-1] for t in open(planted["workload"]).read().splitlines()]
    texts.write_text("\n".join(lines))
    hash_before = base.state_hash()
    env = run_tool(
        "organ-train",
        organ=str(tmp_path / "full"),
        params={
            "concept": str(texts),
            "steps": 3,
            "lr": 1e-3,
            "max_length": 128,
            "out": str(tmp_path / "trained"),
        },
    )
    m = env["result"]["metrics"]
    ref = perplexity(base.model, base.tokenizer, lines, max_length=128)["ppl"]
    assert m["standalone_ppl_before"] == pytest.approx(ref, rel=1e-5)
    assert base.state_hash() == hash_before  # the source is read, never written
    trained = load_organ(tmp_path / "trained")
    assert set(trained.tensors) == set(full.tensors)
    changed = [k for k in full.tensors if not torch.equal(full.tensors[k], trained.tensors[k])]
    assert changed and all(k.split(".", 1)[0].isdigit() for k in changed)  # only the organ's blocks
    assert m["loss_last"] < m["loss_first"]
