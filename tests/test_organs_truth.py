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

from engine.core.errors import GraftError
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
    (pt,) = _t10(planted, planted["twin"], ridge_alpha=1e-8, train_epochs=0)
    assert pt["bridge"] == "closed-form" and pt["position"] == planted["s"]
    assert pt["dev_in"] == pytest.approx(truth, rel=1e-4) and pt["dev_out"] == pytest.approx(truth, rel=1e-4)
    (same,) = _t10(planted, planted["base"], ridge_alpha=1e-8, train_epochs=0)
    assert same["dev_in"] == pytest.approx(0, abs=1e-4) and same["dev_out"] == pytest.approx(0, abs=1e-4)


def test_t10_trained_bridges_start_at_the_identity_and_move_by_adams_step(planted):
    """Through T10: trained bridges start at the identity, and 5 Adam steps of lr 1e-4 move a
    64 x 64 map by about 5 * 1e-4 * 64 at most."""
    steps, lr, d = 5, 1e-4, planted["d"]
    points = _t10(
        planted, planted["twin"], ridge_alpha=1e-8, train_steps=steps, lr=lr, subsets="1", weight_decay=0
    )
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
            "strategy": "bridged-closed-form+trained",
            "bridge_epochs": steps / 5,  # 40 texts, batch 8: 5 steps an epoch
            "joint_epochs": 0,
            "lr": lr,
            "weight_decay": 0,
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


def test_t10_trains_on_the_sizes_it_names_and_refuses_more_than_there_are(planted):
    points = _t10(planted, planted["base"], train_steps=1, sizes="5,12")
    assert [(p["bridge"], p["n_texts"]) for p in points] == [
        ("closed-form", 40),
        ("trained", 5),
        ("trained", 12),
    ]
    with pytest.raises(GraftError, match="40"):
        _t10(planted, planted["base"], train_steps=1, sizes="10,100")


def _kl_to(reference, model, ids):
    """Mean KL(p_reference || p_model) of the next-token distributions over every position."""
    import torch.nn.functional as F

    with torch.no_grad():
        p = F.log_softmax(reference(input_ids=ids).logits.float(), -1)
        q = F.log_softmax(model(input_ids=ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


MEMO = [
    "A red kite circled twice above the harbour wall.",
    "Seven lanterns hung from the bakery's low ceiling.",
    "The ferry leaves the northern pier at a quarter past six.",
    "Old maps of the county show a mill beside the ford.",
    "Her bicycle had a wicker basket and a brass bell.",
    "Snow closed the mountain pass for most of January.",
    "The choir rehearsed in the chapel on Thursday evenings.",
    "A single candle lit the narrow stairway to the attic.",
]


def test_recovery_undoes_noise_on_the_neighbours_of_an_identity_organ(one_thread):
    """Planted: T is a tiny model that has memorised eight texts (so its own logits are what LM loss
    on them asks for). The organ is T's own block s, put back at s (the identity transplant), and
    the neighbouring blocks s-1 and s+1 get noise of twice their weights' spread. Recovery (the
    paper's direct strategy: organ and neighbours trained by LM loss on the same texts) must restore
    T's logits: the KL from T's next-token distributions falls tenfold, and T's greedy next tokens
    come back (at most half agree after the noise, at least 90% after recovery)."""
    import copy

    from engine.core.train_config import TrainConfig
    from engine.surgery.organ_surgery import OrganInsertion, Placement
    from engine.surgery.organ_train import train_lm

    base = load_model(ModelSpec.parse("tiny-llama-a"), "cpu")
    memo = copy.deepcopy(base.model)
    losses = train_lm(memo, base.tokenizer, MEMO, list(memo.parameters()),
                      TrainConfig(steps=150, lr=3e-3, weight_decay=0.0), seed=0)  # fmt: skip
    assert losses[-1] < 0.2  # memorised
    t = dataclasses.replace(base, model=memo, arch=ArchAdapter(memo), spec=ModelSpec("path", "/memorised"))
    ids = [torch.tensor([base.tokenizer(x)["input_ids"]]) for x in MEMO]

    def kl(m):
        return sum(_kl_to(memo, m, x) for x in ids) / len(ids)

    def agreement(m):
        with torch.no_grad():
            same = [(memo(input_ids=x).logits.argmax(-1) == m(input_ids=x).logits.argmax(-1)) for x in ids]
        return float(torch.cat([s.reshape(-1) for s in same]).float().mean())

    s = 1
    ins = OrganInsertion(t, [Placement(extract_organ(t, s, 1), s, "direct")])
    ins.apply()
    assert kl(ins.working) < 1e-10 and agreement(ins.working) == 1.0  # the identity transplant
    noise = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i in ins.own_neighbours():
            for p in ins.blocks[i].parameters():
                if p.dim() == 2:
                    p.add_(2.0 * p.std() * torch.randn(p.shape, generator=noise))
    kl_noisy, agree_noisy = kl(ins.working), agreement(ins.working)
    assert agree_noisy < 0.5
    ins.train("organs+neighbours", MEMO, TrainConfig(epochs=40, lr=3e-3, weight_decay=0.0), seed=0)
    kl_rec, agree_rec = kl(ins.working), agreement(ins.working)
    assert kl_rec < kl_noisy / 10 and agree_rec > 0.9, (kl_noisy, kl_rec, agree_noisy, agree_rec)
    ins.rollback()
    assert ins.verify_rollback() and all(p.grad is None for p in memo.parameters())
