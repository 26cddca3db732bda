"""Organ transplantation (docs/methods.md operation 2, T9, T10) on tiny models, against ground truth:
an organ put back where it came from changes nothing; a donor whose residual stream is a known
rotation of the recipient's gives closed-form bridges that recover the rotation and the logits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.core.errors import GraftError
from engine.core.train_config import TrainConfig
from engine.evaluation.evaluate import perplexity
from engine.loading.arch import ArchAdapter
from engine.loading.models import LoadedModel, ModelSpec, ModelStore, load_model
from engine.running.live import LiveTransplants
from engine.running.runner import run_tool
from engine.surgery.organ import ORGAN_CARD, ORGAN_TENSORS, check_fits, extract_organ, load_organ, save_organ
from engine.surgery.organ_surgery import OrganInsertion, Placement
from engine.surgery.organ_train import train_organ

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Light travels faster than sound, which is why we see lightning first.",
    "The orchestra played a symphony in four movements last night.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "Mountains, rivers, forests and deserts shape where people live.",
    "In the year 1969 people walked on the moon for the first time.",
] * 3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store():
    return ModelStore()


def _model(store, name):
    return store.get(ModelSpec.parse(name), "cpu")


def _logits(model, tok, text=TEXTS[1]):
    with torch.inference_mode():
        return model(tok(text, return_tensors="pt").input_ids).logits


def test_checkpoint_round_trip_is_bit_exact_and_inserts_identically(store, tmp_path):
    m = _model(store, "tiny-llama-a")
    organ = extract_organ(m, 1, 2)
    back = load_organ(save_organ(organ, tmp_path / "o"))
    assert back.tensors.keys() == organ.tensors.keys()
    assert all(
        torch.equal(back.tensors[k], organ.tensors[k]) and back.tensors[k].dtype == organ.tensors[k].dtype
        for k in organ.tensors
    )
    target = _model(store, "tiny-llama-b")
    a, b = OrganInsertion(target, [Placement(organ, 2)]), OrganInsertion(target, [Placement(back, 2)])
    a.apply(), b.apply()
    assert a.weight_hash() == b.weight_hash()
    assert (
        perplexity(a.working, target.tokenizer, TEXTS)["ppl"]
        == perplexity(b.working, target.tokenizer, TEXTS)["ppl"]
    )


def test_tampered_checkpoints_are_refused(store, tmp_path):
    organ = extract_organ(_model(store, "tiny-gpt2-a"))
    good = save_organ(organ, tmp_path / "good")
    card = json.loads((good / ORGAN_CARD).read_text())
    for name, edit in [
        ("hidden", lambda c: c.update(hidden_size=128)),
        ("size", lambda c: c.update(size=2, layers=[1, 2])),
    ]:
        d = tmp_path / name
        save_organ(organ, d)
        c = dict(card)
        edit(c)
        (d / ORGAN_CARD).write_text(json.dumps(c))
        with pytest.raises(GraftError, match="organ checkpoint"):
            load_organ(d)
    d = tmp_path / "trunc"
    save_organ(organ, d)
    raw = (d / ORGAN_TENSORS).read_bytes()
    (d / ORGAN_TENSORS).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(GraftError, match="truncated"):
        load_organ(d)
    (d / ORGAN_TENSORS).write_bytes(
        raw[:-8] + bytes(8)
    )  # same length, last bytes zeroed: the hash catches it
    with pytest.raises(GraftError, match="tensors_sha256|truncated"):
        load_organ(d)
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / ORGAN_CARD).write_text("{")
    (tmp_path / "notjson" / ORGAN_TENSORS).write_bytes(raw)
    with pytest.raises(GraftError, match="not valid JSON"):
        load_organ(tmp_path / "notjson")


def test_signature_mismatch_and_bad_positions_are_refused(store):
    organ = extract_organ(_model(store, "tiny-gpt2-a"))
    with pytest.raises(GraftError, match="same family"):
        check_fits(organ, _model(store, "tiny-llama-b"))
    with pytest.raises(GraftError, match="out of range"):
        OrganInsertion(_model(store, "tiny-gpt2-b"), [Placement(organ, 2)])
    with pytest.raises(GraftError, match="overlap"):
        OrganInsertion(
            _model(store, "tiny-gpt2-b"),
            [
                Placement(extract_organ(_model(store, "tiny-gpt2-a"), 0, 2), 0),
                Placement(extract_organ(_model(store, "tiny-gpt2-a"), 0, 2), 1),
            ],
        )


@pytest.mark.parametrize("name", ["tiny-gpt2-a", "tiny-llama-a"])
def test_identity_organ_direct_and_bridged_leave_logits_unchanged(store, name):
    m = _model(store, name)
    ref = _logits(m.model, m.tokenizer)
    organ = extract_organ(m)
    h0 = m.state_hash()
    direct = OrganInsertion(m, [Placement(organ, organ.start, "direct")])
    direct.apply()
    assert torch.equal(_logits(direct.working, m.tokenizer), ref)
    bridged = OrganInsertion(m, [Placement(organ, organ.start, "bridged")])
    bridged.fit_bridges([m], TEXTS)
    dev = bridged.deviations()[0]
    assert dev["in"] < 1e-5 and dev["out"] < 1e-5
    torch.testing.assert_close(_logits(bridged.working, m.tokenizer), ref, rtol=1e-5, atol=1e-5)
    # a wrong position is not the identity: the check can fail
    moved = OrganInsertion(m, [Placement(organ, 0, "direct")])
    moved.apply()
    assert not torch.allclose(_logits(moved.working, m.tokenizer), ref, atol=1e-3)
    for ins in (direct, bridged, moved):
        ins.rollback()
        assert ins.verify_rollback() and ins.weight_hash() == h0
    assert m.state_hash() == h0  # the cached model was never written


def test_planted_rotation_is_recovered_by_closed_form_bridges(store):
    from engine.surgery.twin import rotate_model

    base = _model(store, "tiny-llama-a")
    twin_model, Q = rotate_model(load_model(ModelSpec.parse("tiny-llama-a"), "cpu").model, seed=7)
    twin = LoadedModel(
        ModelSpec.parse("tiny-llama-a"),
        twin_model,
        base.tokenizer,
        ArchAdapter(twin_model),
        base.device,
        base.dtype,
        "",
    )
    organ = extract_organ(twin)  # blocks of a model whose stream is base's stream rotated by Q
    ref = _logits(base.model, base.tokenizer)
    direct = OrganInsertion(base, [Placement(organ, organ.start, "direct")])
    direct.apply()
    assert (_logits(direct.working, base.tokenizer) - ref).abs().max() > 1e-2  # the rotation matters
    bridged = OrganInsertion(base, [Placement(organ, organ.start, "bridged")])
    bridged.fit_bridges([twin], TEXTS, alpha=1e-8)
    br = bridged.bridges.items[0]
    q = Q.double()
    planted = float(torch.linalg.matrix_norm(q - torch.eye(q.shape[0], dtype=torch.float64)))
    dev = bridged.deviations()[0]
    assert dev["in"] == pytest.approx(planted, rel=1e-3) and dev["out"] == pytest.approx(planted, rel=1e-3)
    w = br.w_in.detach().double()
    assert min(float((w - q).norm()), float((w - q.T).norm())) < 1e-2 * planted
    torch.testing.assert_close(_logits(bridged.working, base.tokenizer), ref, rtol=1e-3, atol=1e-3)


def test_save_and_reload_give_the_same_perplexity(store, tmp_path):
    m = _model(store, "tiny-gpt2-b")
    organ = extract_organ(_model(store, "tiny-gpt2-a"), 1, 2)
    for mode in ("direct", "bridged"):
        ins = OrganInsertion(m, [Placement(organ, 1, mode)])
        if mode == "bridged":
            ins.fit_bridges([_model(store, "tiny-gpt2-a")], TEXTS)
        ins.apply()
        ppl = perplexity(ins.working, m.tokenizer, TEXTS)["ppl"]
        out = ins.save_card(tmp_path / mode, {"operation": "organ-transplant"})
        card = json.loads((out / "surgery.json").read_text())
        assert (card["bridges"] is None) == (mode == "direct")
        assert (out / "bridges.safetensors").exists() == (mode == "bridged")
        back = load_model(ModelSpec.parse(str(out)), "cpu")
        assert perplexity(back.model, back.tokenizer, TEXTS)["ppl"] == pytest.approx(ppl, rel=1e-6)
        ins.rollback()
        assert ins.verify_rollback()


def test_standalone_training_is_deterministic_and_lowers_the_loss(store):
    m = _model(store, "tiny-llama-a")
    organ = extract_organ(m)
    cfg = TrainConfig(steps=6, lr=3e-3, warmup=0.0, weight_decay=0.0)
    a, la, ma = train_organ(m, organ, TEXTS, cfg, seed=3)
    b, lb, _ = train_organ(m, organ, TEXTS, cfg, seed=3)
    assert la == lb and a.sha256() == b.sha256() and a.sha256() != organ.sha256()
    assert ma["standalone_ppl_after"] < ma["standalone_ppl_before"]
    assert a.input_layer == 0 and a.card["training"]["total_steps"] == 6 and len(la) == 6
    assert organ.sha256() == organ.card["tensors_sha256"]  # the original organ was not trained in place


def test_recovery_and_composition_roll_back_bit_exactly(store):
    m = _model(store, "tiny-llama-b")
    a = extract_organ(_model(store, "tiny-llama-a"), 0, 1)
    h0 = m.state_hash()
    ins = OrganInsertion(m, [Placement(a, 0), Placement(a, 2)])  # two organs, spacing 1
    ins.apply()
    assert len(ins.train("organs+neighbours", TEXTS, TrainConfig(steps=2, lr=1e-3), seed=0)) == 2
    assert ins.extra_bytes() == ins.swapped_bytes > 0
    ins.rollback()
    assert ins.verify_rollback() and ins.weight_hash() == h0 and m.state_hash() == h0


def test_live_keeps_an_insertion_for_rollback_and_save(store, tmp_path, tiny_organ, sets):
    live = LiveTransplants()
    env = run_tool(
        "organ-insert",
        target=ModelSpec.parse("tiny-gpt2-b"),
        organ=tiny_organ["path"],
        store=store,
        params={"position": 0, "strategy": "bridged-closed-form", **sets},
        live=live,
    )
    r = env["result"]
    assert r["live_id"] and r["rollback_bit_exact"] and r["target_untouched"]
    assert r["bridge_deviation"]["in"] > 0 and r["after"]["ppl_concept"] != r["before"]["ppl_concept"]
    assert live.rollback(r["live_id"])["bit_exact"]
    out = live.save(r["live_id"], tmp_path / "tp")
    assert (out / "bridges.safetensors").exists()


def test_identity_organ_in_t9_matches_the_baseline(store, tmp_path, sets, workload):
    organ = save_organ(extract_organ(_model(store, "tiny-gpt2-a")), tmp_path / "o")
    env = run_tool(
        "position-sweep",
        target=ModelSpec.parse("tiny-gpt2-a"),
        organ=str(organ),
        store=store,
        options={"workload": workload},
        params=sets,
    )
    r = env["result"]
    assert [p["position"] for p in r["points"]] == [0, 1]
    at_home = next(p for p in r["points"] if p["position"] == 1)
    assert at_home["ppl_concept"] == r["baseline"]["ppl_concept"]
    assert at_home["epsilon"] == pytest.approx(0.0, abs=1e-6)  # T4: the organ's own input stream
    # best / worst are the points of lowest / highest concept perplexity, whichever they are
    by_ppl = sorted(r["points"], key=lambda p: p["ppl_concept"])
    assert r["best"] == {"position": by_ppl[0]["position"], "ppl_concept": by_ppl[0]["ppl_concept"]}
    assert r["worst"] == {"position": by_ppl[-1]["position"], "ppl_concept": by_ppl[-1]["ppl_concept"]}
    vals = [p["ppl_concept"] for p in r["points"]]
    assert (
        r["variance"] == pytest.approx(sum((v - sum(vals) / 2) ** 2 for v in vals) / 2, abs=2e-6)
        and r["variance"] > 0
    )


def test_cli_commands_write_the_envelope(tmp_path, tiny_organ, sets, workload):
    def cli(*args):
        out = tmp_path / f"{args[0]}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "engine", *args, "--json", str(out), "--quiet"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(out.read_text())

    env = cli(
        "organ-extract",
        "--donor",
        "tiny-gpt2-a",
        "--start",
        "0",
        "--size",
        "2",
        "--out",
        str(tmp_path / "org"),
    )
    assert {"tool", "donor", "target", "result"} <= set(env) and env["result"]["organ"]["layers"] == [0, 1]
    env = cli(
        "organ-insert",
        "--organ",
        str(tmp_path / "org"),
        "--target",
        "tiny-gpt2-b",
        "--position",
        "2",
        "--strategy",
        "bridged-closed-form",
        "--concept",
        sets["concept"],
        "--retained",
        sets["retained"],
        "--workload",
        workload,
    )
    r = env["result"]
    assert env["target"] == "tiny-gpt2-b" and r["mode"] == "bridged" and r["position"] == 2
    assert r["strategy"] == "bridged-closed-form" and r["bridge"] == "closed-form (training-free)"
    assert set(r["before"]) == {"ppl_concept", "ppl_retained", "task_score"} and set(
        r["bridge_deviation"]
    ) == {"in", "out"}
    assert r["live_id"] is None and r["rollback_bit_exact"]
    env = cli(
        "bridge-deviation",
        "--organ",
        str(tmp_path / "org"),
        "--target",
        "tiny-gpt2-b",
        "--positions",
        "0,2",
        "--train-steps",
        "2",
        "--subsets",
        "1",
        "--workload",
        workload,
    )
    kinds = {(p["position"], p["bridge"]) for p in env["result"]["points"]}
    assert kinds == {(0, "closed-form"), (0, "trained"), (2, "closed-form"), (2, "trained")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "organ-insert",
            "--organ",
            str(tmp_path / "org"),
            "--target",
            "tiny-llama-b",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert (
        proc.returncode == 2 and "same family" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    )


@pytest.mark.parametrize("mode", ["direct", "bridged-closed-form"])
def test_an_organ_run_is_rebuilt_from_the_history_and_checked_by_t12(store, tiny_organ, sets, workload, mode):
    """After a restart an organ-insertion run is rebuilt (same organ, position, bridges on the same
    workload) to the run's exact T' hash, and T12 runs on it by run id; a changed organ is refused."""
    from engine.running.history import History, new_run_id
    from engine.running.rebuild import rebuild_transplant, rebuildable_tools
    from engine.running.runner import pair_labels

    assert "organ-insert" in rebuildable_tools()
    env = run_tool(
        "organ-insert",
        target=ModelSpec.parse("tiny-gpt2-b"),
        organ=tiny_organ["path"],
        store=store,
        options={"workload": workload},
        params={"position": 0, "strategy": mode, **sets},
    )
    run_id = new_run_id("test-")
    history = History()
    history.create(run_id, "organ-insert", "organ", *pair_labels(env), {}, source="cli")
    history.start(run_id)
    env["run_id"] = run_id
    history.finish(run_id, "done", result=json.loads(json.dumps(env)))

    fresh = ModelStore()  # a restarted process
    rebuilt = rebuild_transplant(json.loads(json.dumps(env)), fresh)
    assert (
        rebuilt.edit.weight_hash()
        == env["result"]["weight_hash_after"]
        != env["result"]["weight_hash_before"]
    )
    assert rebuilt.undo() > 0 and rebuilt.edit.matches_target()

    t12 = run_tool(
        "interference",
        run=run_id,
        store=fresh,
        options={"workload": workload},
        params={"retained": sets["retained"], "max_new_tokens": 4},
    )["result"]
    assert t12["stability"]["reapply"]["passed"] and t12["stability"]["reload"]["passed"], t12["stability"]
    assert t12["stability"]["reload"]["weight_hash_matches_card"], t12["stability"]["reload"]

    tampered = json.loads(json.dumps(env))
    tampered["result"]["card"]["organs"][0]["tensors_sha256"] = "0" * 64
    with pytest.raises(GraftError, match="organ .* has changed"):
        rebuild_transplant(tampered, ModelStore())


def test_gemma3_organ_with_per_head_norms_round_trips_and_puts_back_identically(store, tmp_path):
    """Gemma 3 (and Qwen 3) blocks hold head_dim-wide q_norm / k_norm weights beside the hidden-wide
    norms: the checkpoint's width check must tell them apart (it refused every Gemma 3 organ)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from engine.loading.tiny import build_tiny

    _, tok = build_tiny("tiny-llama-a")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        Gemma3TextConfig(
            num_hidden_layers=4,
            hidden_size=48,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=96,
            vocab_size=len(tok),
            sliding_window=16,
        )
    )
    folder = tmp_path / "gemma3"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    m = store.get(ModelSpec.parse(str(folder)), "cpu")
    organ = extract_organ(m, 1, 2)
    assert any("q_norm" in k for k in organ.tensors)  # the per-head norms are really there
    back = load_organ(save_organ(organ, tmp_path / "organ"))
    assert all(torch.equal(back.tensors[k], organ.tensors[k]) for k in organ.tensors)
    ref = _logits(m.model, m.tokenizer)
    ins = OrganInsertion(m, [Placement(back, 1)])
    ins.apply()
    assert torch.equal(_logits(ins.working, m.tokenizer), ref)
    # a card whose hidden size disagrees with the block norms is still refused, before anything is written
    bad = extract_organ(m, 1, 2)
    bad.card["hidden_size"] = 16
    with pytest.raises(GraftError, match="hidden size"):
        save_organ(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def _padded_pair(tmp_path):
    """A Llama of width 48 (A) and one of width 80 (B) whose residual stream is exactly [h_A, 0]:
    every input side of B's linears is A's padded with zero columns, every output side padded with
    zero rows, and B's RMSNorm weights (and eps) rescaled by 48/80 so normalising 80 coordinates of
    which 32 are 0 gives A's numbers. Ground truth for bridges across widths: the exact bridges are
    the rectangular identities (keep the first 48 coordinates; pad with zeros)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from engine.loading.tiny import build_tiny

    _, tok = build_tiny("tiny-llama-a")
    kw = dict(
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=96,
        vocab_size=len(tok),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    a = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=48, rms_norm_eps=1e-6, **kw))
    b = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=80, rms_norm_eps=0.6e-6, **kw))
    scale = (48 / 80) ** 0.5
    with torch.no_grad():
        for name, pb in b.state_dict().items():
            pa = a.state_dict()[name]
            if "norm" in name:
                pb.zero_()[:48] = pa * scale
            elif pa.dim() == 2:
                pb.zero_()[: pa.shape[0], : pa.shape[1]] = pa
            else:
                pb.copy_(pa)
    out = []
    for name, m in (("a48", a), ("b80", b)):
        m.save_pretrained(str(tmp_path / name))
        tok.save_pretrained(str(tmp_path / name))
        out.append(str(tmp_path / name))
    return out


def test_bridges_across_widths_recover_the_planted_embedding_and_save_and_reload(store, tmp_path):
    fa, fb = _padded_pair(tmp_path)
    a, b = store.get(ModelSpec.parse(fa), "cpu"), store.get(ModelSpec.parse(fb), "cpu")
    ref = _logits(a.model, a.tokenizer)
    torch.testing.assert_close(
        _logits(b.model, b.tokenizer), ref, rtol=1e-4, atol=1e-4
    )  # the planted embedding holds
    organ = extract_organ(a, 1, 2)
    with pytest.raises(GraftError, match="insert it bridged"):
        OrganInsertion(b, [Placement(organ, 1, "direct")])
    ins = OrganInsertion(b, [Placement(organ, 1, "bridged")])
    ins.fit_bridges([a], TEXTS, alpha=1e-3)
    br = ins.bridges.items[0]
    assert tuple(br.w_in.shape) == (80, 48) and tuple(br.w_out.shape) == (48, 80)
    dev = ins.deviations()[0]
    # W = the rectangular identities, found in closed form (W_out to the float32 round-off between the
    # 48- and 80-wide computations of the same stream, amplified by the ridge's weakest directions)
    assert dev["in"] < 1e-5 and dev["out"] < 1e-2, dev
    torch.testing.assert_close(_logits(ins.working, b.tokenizer), ref, rtol=1e-3, atol=1e-3)
    moved = OrganInsertion(
        b, [Placement(organ, 0, "bridged")]
    )  # the wrong place is not the identity: can fail
    moved.fit_bridges([a], TEXTS, alpha=1e-3)
    assert not torch.allclose(_logits(moved.working, b.tokenizer), ref, atol=1e-2)

    # saved: the HF weights keep B's blocks, the organ's 48-wide blocks and the bridges go beside them
    out = ins.save_card(tmp_path / "saved", {"operation": "organ transplant (bridged)"})
    card = json.loads((out / "surgery.json").read_text())
    assert [x["index"] for x in card["bridges"]["organ_blocks"]["blocks"]] == [1, 2]
    back = load_model(ModelSpec.parse(str(out)), "cpu")
    assert torch.equal(_logits(back.model, back.tokenizer), _logits(ins.working, b.tokenizer))
    from engine.loading.models import state_dict_hash
    from engine.surgery.organ_bridge import ATTR

    assert card["saved_weight_hash"] == state_dict_hash(
        {k: v for k, v in back.model.state_dict().items() if not k.startswith(ATTR + ".")}
    )
    ins.rollback()
    assert ins.verify_rollback() and b.state_hash() == ins.hash_before()
