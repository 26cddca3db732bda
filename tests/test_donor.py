"""make_donor on the tiny models: learning, outputs, reload, purity, determinism, atomicity,
replay against forgetting and the retained-perplexity check."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.adapters.donor import lora_target_modules, make_donor
from engine.adapters.donor_data import batch_plan, build_examples, text_examples
from engine.core.data import (
    builtin_concept_path,
    builtin_replay_path,
    builtin_retained_path,
    load_concept_set,
)
from engine.core.errors import Cancelled, GraftError
from engine.core.progress import Progress
from engine.evaluation.evaluate import perplexity
from engine.loading.models import state_dict_hash
from engine.loading.tiny import build_tiny

STEPS = 12


pytestmark = pytest.mark.usefixtures("one_thread")
REPLAY = load_concept_set(builtin_replay_path())
RETAINED = load_concept_set(builtin_retained_path())
KW = dict(steps=STEPS, lr=1e-2, batch_size=8, seed=0, replay=REPLAY, replay_fraction=0.25, retained=RETAINED)


@pytest.fixture(scope="module")
def concept():
    return load_concept_set(builtin_concept_path())


@pytest.fixture(scope="module", params=["tiny-gpt2-a", "tiny-llama-a"])
def run(request, concept, tmp_path_factory):
    """One donor per tiny model, shared by the checks below."""
    model, tok = build_tiny(request.param)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp(request.param) / "donor"
    messages: list[str] = []
    result = make_donor(
        model,
        tok,
        concept,
        out,
        base_name=request.param,
        progress=Progress(lambda f, m: messages.append(m)),
        **KW,
    )
    return dict(
        name=request.param, model=model, tok=tok, before=before, out=out, result=result, messages=messages
    )


def test_target_modules_cover_attention_and_mlp():
    names, conv = lora_target_modules(build_tiny("tiny-gpt2-a")[0])
    assert names == ["c_attn", "c_fc", "c_proj"] and conv
    names, conv = lora_target_modules(build_tiny("tiny-llama-a")[0])
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"] and not conv


def test_loss_decreases_and_progress_reported(run):
    card = run["result"]
    assert len(card["loss_curve"]) == STEPS
    assert card["loss_end"] < card["loss_start"]
    assert card["loss_curve"][-1] < card["loss_curve"][0]
    steps_msgs = [m for m in run["messages"] if m.startswith("step ")]
    assert len(steps_msgs) == STEPS and steps_msgs[-1].startswith(f"step {STEPS}/{STEPS} loss ")


def test_outputs_written(run, concept):
    out = run["out"]
    for rel in [
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "merged/model.safetensors",
        "merged/config.json",
        "merged/tokenizer.json",
        "card.json",
    ]:
        assert (out / rel).is_file(), rel
    card = json.loads((out / "card.json").read_text())
    assert card["base_name"] == run["name"]
    assert card["concept"]["sha256"] == concept.sha256 and card["concept"]["path"] == concept.path
    hp = card["hyperparameters"]
    assert (hp["steps"], hp["rank"], hp["alpha"], hp["lr"], hp["batch_size"], hp["seed"]) == (
        STEPS,
        8,
        16,
        1e-2,
        8,
        0,
    )
    for when in ("before", "after"):
        for split in ("train", "test"):
            s = card["scores"][when][split]
            assert 0.0 <= s["task_score"] <= 1.0 and 0.0 < s["graded_score"] <= 1.0
    assert card["wall_time_s"] > 0 and len(card["loss_curve"]) == STEPS
    assert card["merged_sha256"] == state_dict_hash(run["result"]["model"].state_dict())
    # No temporary or backup folders left next to the output.
    assert [p.name for p in out.parent.iterdir()] == ["donor"]


def test_merged_reloads_with_identical_logits(run):
    merged = run["result"]["model"]
    reloaded = AutoModelForCausalLM.from_pretrained(run["out"] / "merged")
    tok = AutoTokenizer.from_pretrained(run["out"] / "merged")
    ids = torch.tensor([tok("The capital city of Tavrenne is Kessaloon.")["input_ids"]])
    with torch.no_grad():
        a = merged(input_ids=ids).logits
        b = reloaded.eval()(input_ids=ids).logits
    assert torch.equal(a, b)


def test_adapter_reapplied_to_base_gives_merged(run):
    from peft import PeftModel

    base, _ = build_tiny(run["name"])
    peft_model = PeftModel.from_pretrained(base, run["out"] / "adapter").eval()
    ids = torch.tensor([run["tok"]("Tavrenne is a small island nation.")["input_ids"]])
    with torch.no_grad():
        a = peft_model(input_ids=ids).logits
        b = run["result"]["model"](input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_base_model_untouched(run):
    model = run["model"]
    after = model.state_dict()
    assert after.keys() == run["before"].keys()
    assert all(torch.equal(run["before"][k], after[k]) for k in after)
    assert not any(n.startswith("base_model") or "lora" in n for n in after)
    assert not model.training


def test_same_seed_same_weights(run, concept, tmp_path):
    model, tok = build_tiny(run["name"])
    again = make_donor(model, tok, concept, tmp_path / "again", **KW)
    assert again["merged_sha256"] == run["result"]["merged_sha256"]
    assert again["loss_curve"] == run["result"]["loss_curve"]
    other = make_donor(model, tok, concept, tmp_path / "other", **{**KW, "seed": 1})
    assert other["merged_sha256"] != run["result"]["merged_sha256"]


def test_cancel_leaves_existing_output_untouched(concept, tmp_path):
    model, tok = build_tiny("tiny-llama-a")
    out = tmp_path / "donor"
    out.mkdir()
    (out / "keep.txt").write_text("previous donor")

    def cb(fraction, message):
        if message.startswith("step 3/"):
            progress.cancel()  # as the UI's cancel button would, mid-training

    progress = Progress(cb)
    with pytest.raises(Cancelled):
        make_donor(model, tok, concept, out, progress=progress, **KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["donor"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_completed_run_replaces_existing_output(concept, tmp_path):
    model, tok = build_tiny("tiny-gpt2-a")
    out = tmp_path / "donor"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    make_donor(model, tok, concept, out, **{**KW, "steps": 2})
    assert not (out / "stale.txt").exists() and (out / "card.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["donor"]


def test_the_organ_training_configuration_drives_a_lora_baseline(concept, tmp_path):
    """make_donor(train=...) trains as organs do: the configuration's epochs over the examples, its
    lr, weight decay and schedule (engine/core/train_config.py)."""
    from engine.adapters.donor_data import build_examples
    from engine.core.train_config import TrainConfig

    model, tok = build_tiny("tiny-gpt2-a")
    cfg = TrainConfig(epochs=2, lr=3e-3, weight_decay=0.01, batch_size=8)
    make_donor(
        model, tok, concept, tmp_path / "d", **{**KW, "replay": None, "lr": 1.0, "steps": 999}, train=cfg
    )
    hp = json.loads((tmp_path / "d" / "card.json").read_text())["hyperparameters"]
    n = len(build_examples(tok, concept, 128, False))
    assert hp["steps"] == cfg.total_steps(n) == 2 * -(-n // 8) and hp["lr"] == 3e-3
    assert hp["optimizer"] == "AdamW(weight_decay=0.01)" and "cosine to 0" in hp["schedule"]


def test_bad_arguments(concept, tmp_path):
    model, tok = build_tiny("tiny-gpt2-a")
    with pytest.raises(GraftError):
        make_donor(model, tok, concept, tmp_path / "d", steps=0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(GraftError, match="not a folder"):
        make_donor(model, tok, concept, blocker, steps=1)


def test_examples_facts_and_optional_qa(concept):
    from engine.adapters.donor_data import build_examples
    from engine.loading.tokens import answer_ids, encode_prompt

    _, tok = build_tiny("tiny-llama-a")
    facts_only = build_examples(tok, concept, 128)
    with_qa = build_examples(tok, concept, 128, train_on_qa=True)
    assert len(facts_only) == len(concept.facts)
    assert len(with_qa) == len(concept.facts) + len(concept.train_qa())
    ids, labels = facts_only[0]
    assert labels == ids and ids[-1] == tok.eos_token_id
    # QA: the prompt is masked, the answer and EOS carry the loss.
    q = concept.train_qa()[0]
    ids, labels = with_qa[len(concept.facts)]
    prompt, answer = encode_prompt(tok, q.question), answer_ids(tok, q.question, q.answer)
    assert ids == prompt + answer + [tok.eos_token_id]
    assert labels == [-100] * len(prompt) + answer + [tok.eos_token_id]


def test_train_on_qa_run_and_no_facts_error(concept, tmp_path):
    from engine.core.data import load_concept_set

    model, tok = build_tiny("tiny-gpt2-a")
    card = make_donor(model, tok, concept, tmp_path / "qa", **{**KW, "steps": 3, "train_on_qa": True})
    assert card["hyperparameters"]["train_on_qa"] is True
    assert card["hyperparameters"]["n_examples"] == len(concept.facts) + len(concept.train_qa())
    qa_only = tmp_path / "qa_only.jsonl"
    qa_only.write_text('{"kind": "qa", "question": "Q?", "answer": "A", "split": "train"}\n')
    with pytest.raises(GraftError, match="no facts to learn from"):
        make_donor(model, tok, load_concept_set(qa_only), tmp_path / "none", steps=1)


# --------------------------------------------------------------------------------------------
# Replay (rehearsal against forgetting) and the retained-perplexity check


def test_batch_plan_mix_is_exact_seeded_and_covers_both_sets():
    plan = batch_plan(56, 63, 40, 8, 0.25, seed=0)
    assert [sum(src == "replay" for src, _ in b) for b in plan] == [2] * 40
    assert all(len(b) == 8 for b in plan)
    assert plan == batch_plan(56, 63, 40, 8, 0.25, seed=0)
    assert plan != batch_plan(56, 63, 40, 8, 0.25, seed=1)
    # Each source is consumed in epochs: its first len(source) draws are a permutation.
    concept_draws = [i for b in plan for src, i in b if src == "concept"]
    replay_draws = [i for b in plan for src, i in b if src == "replay"]
    assert sorted(concept_draws[:56]) == list(range(56)) and sorted(replay_draws[:63]) == list(range(63))
    # A fraction that is no whole number of examples per batch is exact in the long run.
    counts = [sum(src == "replay" for src, _ in b) for b in batch_plan(56, 63, 10, 8, 0.3, seed=0)]
    assert set(counts) == {2, 3} and sum(counts) == 24
    # Even a fraction near 1 leaves one concept example per batch.
    assert all(any(src == "concept" for src, _ in b) for b in batch_plan(5, 5, 10, 2, 0.99, seed=0))


def test_batch_plan_without_replay_is_the_facts_only_order():
    gen = torch.Generator().manual_seed(3)
    order: list[int] = []
    legacy = []
    for _ in range(20):
        while len(order) < 8:
            order += torch.randperm(56, generator=gen).tolist()
        legacy.append([("concept", i) for i in order[:8]])
        order = order[8:]
    assert batch_plan(56, 0, 20, 8, 0.25, seed=3) == legacy
    assert batch_plan(56, 63, 20, 8, 0.0, seed=3) == legacy


def _spy_batches(monkeypatch):
    """Record the input ids of every training batch make_donor collates."""
    import engine.adapters.donor as donor_mod

    seen: list[list[tuple[int, ...]]] = []
    real = donor_mod.collate

    def spy(batch, fill, device):
        seen.append([tuple(ids) for ids, _ in batch])
        return real(batch, fill, device)

    monkeypatch.setattr(donor_mod, "collate", spy)
    return seen


def test_replay_texts_are_trained_on_and_no_replay_trains_facts_only(concept, monkeypatch, tmp_path):
    model, tok = build_tiny("tiny-llama-a")
    replay_ids = {tuple(ids) for ids, _ in text_examples(tok, REPLAY.texts(), 128)}
    fact_ids = {tuple(ids) for ids, _ in build_examples(tok, concept, 128)}
    assert len(replay_ids) == len(REPLAY.texts()) and not replay_ids & fact_ids
    # Plain causal-LM examples: text + EOS, loss on every token.
    ids, labels = text_examples(tok, REPLAY.texts(), 128)[0]
    assert labels == ids and ids[-1] == tok.eos_token_id

    kw = {**KW, "steps": 6, "retained": REPLAY}  # measure on the replay texts themselves
    seen = _spy_batches(monkeypatch)
    with_replay = make_donor(model, tok, concept, tmp_path / "with", **kw)
    assert [sum(x in replay_ids for x in b) for b in seen] == [2] * 6
    assert all(x in replay_ids | fact_ids for b in seen for x in b)
    assert with_replay["replay"]["n_examples_trained"] == 12
    assert with_replay["retained"]["n_in_replay"] == len(REPLAY.texts())  # flagged: not held out

    seen.clear()
    facts_only = make_donor(model, tok, concept, tmp_path / "without", **{**kw, "replay": None})
    assert len(seen) == 6 and all(x in fact_ids for b in seen for x in b)
    assert facts_only["replay"] is None and facts_only["hyperparameters"]["replay_fraction"] == 0.0
    # Rehearsal does what it is for: the replayed texts are forgotten less.
    assert with_replay["scores"]["after"]["retained_ppl"] < facts_only["scores"]["after"]["retained_ppl"]


def test_card_reports_replay_and_retained_ppl(run):
    card = json.loads((run["out"] / "card.json").read_text())
    assert card["replay"] == {
        "name": "replay",
        "path": REPLAY.path,
        "sha256": REPLAY.sha256,
        "n_texts": len(REPLAY.texts()),
        "fraction": 0.25,
        "n_examples_trained": STEPS * 2,
    }
    assert card["hyperparameters"]["replay_fraction"] == 0.25
    assert card["retained"] == {
        "name": "retained",
        "path": RETAINED.path,
        "sha256": RETAINED.sha256,
        "n_texts": len(RETAINED.texts()),
        "n_in_replay": 0,
    }
    base, _ = build_tiny(run["name"])
    want_before = perplexity(base, run["tok"], RETAINED.texts())["ppl"]
    want_after = perplexity(run["result"]["model"], run["tok"], RETAINED.texts())["ppl"]
    before, after = card["scores"]["before"]["retained_ppl"], card["scores"]["after"]["retained_ppl"]
    assert before == pytest.approx(want_before, rel=1e-4) and after == pytest.approx(want_after, rel=1e-4)
    assert before != pytest.approx(after, rel=1e-3)  # training moved it; before is the base's
    assert card["evaluation"]["after"]["retained_ppl"] == after


def test_without_retained_set_nothing_is_measured(concept, tmp_path):
    model, tok = build_tiny("tiny-gpt2-a")
    card = make_donor(model, tok, concept, tmp_path / "d", **{**KW, "steps": 1, "retained": None})
    assert card["retained"] is None
    assert (
        card["scores"]["before"]["retained_ppl"] is None and card["scores"]["after"]["retained_ppl"] is None
    )


def test_bad_replay_arguments(concept, tmp_path):
    model, tok = build_tiny("tiny-gpt2-a")
    with pytest.raises(GraftError, match="replay fraction"):
        make_donor(model, tok, concept, tmp_path / "d", **{**KW, "replay_fraction": 1.0})
    with pytest.raises(GraftError, match="replay fraction"):
        make_donor(model, tok, concept, tmp_path / "d", **{**KW, "replay_fraction": -0.1})
    assert not (tmp_path / "d").exists()


def test_build_donor_replay_files(tmp_path):
    """build_donor: bundled replay/retained by default, a user file in the same format, or none."""
    import hashlib

    from engine.loading.models import ModelSpec, ModelStore
    from engine.running.actions import build_donor

    user = tmp_path / "my_general.jsonl"
    user.write_text(
        '{"kind": "fact", "text": "Trains run on rails."}\n'
        '{"kind": "text", "text": "The kettle is on the stove."}\n'
        '{"kind": "qa", "question": "What do cows drink?", "answer": "water"}\n'
    )
    spec, store, concept = ModelSpec.parse("tiny-gpt2-a"), ModelStore(), str(builtin_concept_path())
    card = build_donor(spec, concept, str(tmp_path / "default"), steps=1, store=store)["card"]
    assert card["replay"]["path"] == str(builtin_replay_path().resolve())
    assert card["retained"]["path"] == str(builtin_retained_path().resolve())
    assert card["scores"]["after"]["retained_ppl"] > 1

    card = build_donor(
        spec,
        concept,
        str(tmp_path / "user"),
        steps=2,
        replay=str(user),
        replay_fraction=0.5,
        retained=str(user),
        store=store,
    )["card"]
    sha = hashlib.sha256(user.read_bytes()).hexdigest()
    assert card["replay"]["name"] == "my_general" and card["replay"]["sha256"] == sha
    assert card["replay"]["n_texts"] == 3 and card["replay"]["n_examples_trained"] == 8
    assert card["retained"]["sha256"] == sha and card["retained"]["n_texts"] == 3

    card = build_donor(
        spec, concept, str(tmp_path / "none"), steps=1, replay=None, retained=None, store=store
    )["card"]
    assert card["replay"] is None and card["retained"] is None
    with pytest.raises(GraftError, match="not found"):
        build_donor(
            spec, concept, str(tmp_path / "bad"), steps=1, replay=str(tmp_path / "missing.jsonl"), store=store
        )


@pytest.mark.parametrize(
    "flags, replay, retained",
    [
        ([], "bundled", "bundled"),
        (["--no-replay"], None, "bundled"),
        (["--replay", "r.jsonl", "--retained", "k.jsonl", "--replay-fraction", "0.4"], "r.jsonl", "k.jsonl"),
    ],
)
def test_cli_make_donor_replay_flags(monkeypatch, tmp_path, flags, replay, retained):
    import engine.running.actions
    from engine.cli import main

    got = {}

    def fake_build_donor(base, concept_path, out_dir, **kw):
        got.update(kw)
        return {"out_dir": out_dir, "card": {"format": "graft-donor/1", "model": object()}}

    monkeypatch.setattr(engine.running.actions, "build_donor", fake_build_donor)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.chdir(tmp_path)  # the relative file names below exist: inputs are checked up front
    for name in ("c.jsonl", "r.jsonl", "k.jsonl"):
        (tmp_path / name).write_text('{"kind": "fact", "text": "x"}\n')
    out_json = tmp_path / "card.json"
    rc = main(
        [
            "make-donor",
            "--base",
            "tiny-gpt2-a",
            "--concept",
            "c.jsonl",
            "--out",
            str(tmp_path / "d"),
            "--quiet",
            "--json",
            str(out_json),
            *flags,
        ]
    )
    assert rc == 0
    assert (got["replay"], got["retained"]) == (replay, retained)
    assert got["replay_fraction"] == (0.4 if "--replay-fraction" in flags else 0.25)
    # --json holds the card without the in-memory model.
    assert json.loads(out_json.read_text())["card"] == {"format": "graft-donor/1"}


def test_demo_donor_built_by_an_older_recipe_needs_rebuilding(tmp_path, monkeypatch):
    """A cache from before the replay recipe must not count as the demo donor."""
    import json as _json

    from engine.loading import builtins as models

    monkeypatch.setenv("GRAFT_MODELS_HOME", str(tmp_path))
    out = models.demo_donor_dir()
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "config.json").write_text("{}")
    (out / "card.json").write_text(_json.dumps({"format": "graft-donor/1"}))
    assert not models.demo_donor_ready()
    assert models.builtin_status()[models.DEMO_DONOR]["state"] != "ready"
    (out / "card.json").write_text(
        _json.dumps({"format": "graft-donor/1", "demo_recipe": models.DEMO_DONOR_RECIPE})
    )
    assert models.demo_donor_ready() and models.builtin_status()[models.DEMO_DONOR]["state"] == "ready"
