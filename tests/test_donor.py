"""make_donor on the tiny models: learning, outputs, reload, purity, determinism, atomicity."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.data import builtin_concept_path, load_concept_set
from engine.donor import lora_target_modules, make_donor, weights_sha256
from engine.errors import Cancelled, GraftError
from engine.progress import Progress
from engine.tiny import build_tiny

STEPS = 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and with the suite running beside other
    jobs on a 2-core machine OpenMP spin-waiting makes each small op 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
KW = dict(steps=STEPS, lr=1e-2, batch_size=8, seed=0)


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
    result = make_donor(model, tok, concept, out, base_name=request.param,
                        progress=Progress(lambda f, m: messages.append(m)), **KW)
    return dict(name=request.param, model=model, tok=tok, before=before, out=out, result=result, messages=messages)


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
    for rel in ["adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                "merged/model.safetensors", "merged/config.json", "merged/tokenizer.json", "card.json"]:
        assert (out / rel).is_file(), rel
    card = json.loads((out / "card.json").read_text())
    assert card["base_name"] == run["name"]
    assert card["concept"]["sha256"] == concept.sha256 and card["concept"]["path"] == concept.path
    hp = card["hyperparameters"]
    assert (hp["steps"], hp["rank"], hp["alpha"], hp["lr"], hp["batch_size"], hp["seed"]) == (STEPS, 8, 16, 1e-2, 8, 0)
    for when in ("before", "after"):
        for split in ("train", "test"):
            s = card["scores"][when][split]
            assert 0.0 <= s["task_score"] <= 1.0 and 0.0 < s["graded_score"] <= 1.0
    assert card["wall_time_s"] > 0 and len(card["loss_curve"]) == STEPS
    assert card["merged_sha256"] == weights_sha256(run["result"]["model"])
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


def test_bad_arguments(concept, tmp_path):
    model, tok = build_tiny("tiny-gpt2-a")
    with pytest.raises(GraftError):
        make_donor(model, tok, concept, tmp_path / "d", steps=0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(GraftError, match="not a folder"):
        make_donor(model, tok, concept, blocker, steps=1)


def test_examples_facts_and_optional_qa(concept):
    from engine.donor import build_examples
    from engine.evaluate import answer_ids, encode_prompt

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
    from engine.data import load_concept_set

    model, tok = build_tiny("tiny-gpt2-a")
    card = make_donor(model, tok, concept, tmp_path / "qa", **{**KW, "steps": 3, "train_on_qa": True})
    assert card["hyperparameters"]["train_on_qa"] is True
    assert card["hyperparameters"]["n_examples"] == len(concept.facts) + len(concept.train_qa())
    qa_only = tmp_path / "qa_only.jsonl"
    qa_only.write_text('{"kind": "qa", "question": "Q?", "answer": "A", "split": "train"}\n')
    with pytest.raises(GraftError, match="no facts to learn from"):
        make_donor(model, tok, load_concept_set(qa_only), tmp_path / "none", steps=1)
