"""T12 interference and stability (engine/tools/interference.py, engine/running/rebuild.py).

Ground truth from a planted pair on tiny GPT-2: residual coordinate 0 is made a private channel
that is exactly 30 at the positions of one token z and 0 everywhere else (z's embedding writes it,
no other embedding, position embedding, attention or MLP output writes it). Neuron j of block 0's
MLP reads only that channel, with bias -4, so it fires at z's positions and nowhere else; in T it
writes nothing (its output row is 0), in D it pushes hard towards a token the text never has. D and T are
otherwise equal,
so swapping ``blocks.0.mlp.down`` changes exactly what the one retained text containing z depends
on: that text must be the worst hit, far ahead of every other.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.loading.models import ModelSpec, ModelStore, load_model
from engine.running.rebuild import load_run, reapply_check, rebuild_transplant, reload_check, save_for_check
from engine.running.runner import run_tool

RETAINED = [
    "The quick brown fox jumps over the lazy dog.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Cats and dogs are common pets; parrots can learn to speak words.",
    "Light travels faster than sound, which is why we see lightning first.",
    "The orchestra played a symphony in four movements last night.",
]
NEURON = 7


def _write_retained(path):
    path.write_text("\n".join(json.dumps({"kind": "text", "text": t}) for t in RETAINED) + "\n")
    return str(path)


def _private_token(tok) -> tuple[int, int]:
    """A token id found in exactly one retained text (not as its first token): (token, text index)."""
    ids = [tok(t)["input_ids"] for t in RETAINED]
    for i, seq in enumerate(ids):
        for t in seq[1:]:
            if sum(t in s for s in ids) == 1:
                return t, i
    raise AssertionError("no private token")


@torch.no_grad()
def _channel(m, z: int) -> None:
    """Coordinate 0 of the residual stream = 30 * [token == z], at every layer."""
    tr = m.model.transformer
    tr.wte.weight[:, 0] = 0.0
    tr.wte.weight[z, 0] = 30.0
    tr.wpe.weight[:, 0] = 0.0
    for block in tr.h:
        for proj in (block.attn.c_proj, block.mlp.c_proj):  # Conv1D weights are (in, out)
            proj.weight[:, 0] = 0.0
            proj.bias[0] = 0.0
    fc = tr.h[0].mlp.c_fc
    fc.weight[:, NEURON] = 0.0
    fc.weight[0, NEURON] = 1.0
    fc.bias[NEURON] = -4.0
    tr.h[0].mlp.c_proj.weight[NEURON, :] = 0.0  # T: the neuron writes nothing
    tr.ln_f.weight[0] = 0.0  # the head never reads the channel (GPT-2 ties it to the embeddings)
    tr.ln_f.bias[0] = 0.0
    tr.ln_f.weight.mul_(50.0)  # sharp predictions, so a pushed token costs real loss


@pytest.fixture(scope="module")
def planted():
    target = load_model(ModelSpec.parse("tiny-gpt2-a"), "cpu")
    donor = load_model(ModelSpec.parse("tiny-gpt2-a"), "cpu")
    z, index = _private_token(target.tokenizer)
    _channel(target, z)
    _channel(donor, z)
    wrong = next(t for t in range(1, 512) if t not in target.tokenizer(RETAINED[index])["input_ids"])
    with torch.no_grad():
        row = donor.model.transformer.wte.weight[wrong].clone()
        row[0] = 0.0
        # D: the neuron writes a large push towards a token the planted text never contains
        donor.model.transformer.h[0].mlp.c_proj.weight[NEURON, :] = 24.0 * row / row.norm()
    return donor, target, index


def test_planted_text_is_the_worst_hit(planted, tmp_path, one_thread):
    donor, target, index = planted
    h = target.state_hash()
    env = run_tool(
        "interference",
        donor,
        target,
        {},
        {
            "modules": "blocks.0.mlp.down",
            "stability": False,
            "retained": _write_retained(tmp_path / "r.jsonl"),
        },
    )
    r = env["result"]
    assert r["source"]["modules"] == ["blocks.0.mlp.down"]
    assert r["worst_index"] == index
    rows = r["retained"]["per_example"]
    hit = rows[index]["loss_change"]
    others = max(abs(x["loss_change"]) for i, x in enumerate(rows) if i != index)
    assert hit > 0.05 and hit > 20 * others, (hit, others)
    assert r["retained"]["worst"][0]["text"] == RETAINED[index]
    assert sum(r["retained"]["histogram"]["counts"]) == len(RETAINED)
    assert target.state_hash() == h  # the cached target is never written; T' was rolled back


def test_no_op_transplant_has_locality_one_and_zero_change(tmp_path, one_thread):
    a = ModelSpec.parse("tiny-gpt2-a")
    env = run_tool(
        "interference",
        a,
        a,
        {},
        {
            "modules": "blocks.0.mlp.down,blocks.2.attn.o",
            "retained": _write_retained(tmp_path / "r.jsonl"),
            "texts": _write_retained(tmp_path / "mine.jsonl"),
        },
    )
    r = env["result"]
    assert r["locality"] == 1.0 and r["retained"]["n_changed"] == 0 and r["retained"]["changed"] == []
    assert all(x["loss_change"] == 0.0 for x in r["retained"]["per_example"])
    assert r["mean_loss_change"] == 0.0 and r["ppl_change_fraction"] == 0.0
    assert r["extra"]["n_examples"] == len(RETAINED) and r["extra"]["locality"] == 1.0
    assert r["stability_passed"] is True


def test_a_run_from_the_history_is_rebuilt_and_is_stable(tiny_run, one_thread):
    env = run_tool("interference", run=tiny_run["run_id"])
    r = env["result"]
    run = tiny_run["envelope"]["result"]
    assert r["source"]["run_id"] == tiny_run["run_id"] and r["source"]["operation"] == "module-swap"
    assert r["source"]["weight_hash_after"] == run["weight_hash_after"]
    st = r["stability"]
    assert st["reapply"]["passed"] and st["reapply"]["hash_first"] == run["weight_hash_after"], st["reapply"]
    assert st["reload"]["passed"] and st["reload"]["max_abs_loss_change"] == 0.0, st["reload"]
    assert r["stability_passed"] is True


def test_stability_checks_fail_when_tampered(tiny_run, tmp_path, one_thread):
    rb = rebuild_transplant(load_run(tiny_run["run_id"]), ModelStore())
    try:

        class Tampered:  # the second application writes something else into a swapped weight
            def __init__(self, edit):
                self.edit = edit

            def __getattr__(self, name):
                return getattr(self.edit, name)

            def apply(self):
                self.edit.apply()
                path = self.edit.linear[self.edit.modules[0]].path
                with torch.no_grad():
                    dict(self.edit.working.named_modules())[path].weight.add_(1e-3)

        bad = reapply_check(Tampered(rb.edit))
        assert not bad["passed"] and "hashes differ" in bad["detail"], bad
    finally:
        rb.undo()  # restores the swapped weights (tampered or not) from the target's own tensors
    rb = rebuild_transplant(load_run(tiny_run["run_id"]), ModelStore())
    try:
        texts = RETAINED
        from engine.evaluation.evaluate import perplexity

        ref = perplexity(rb.working, rb.target.tokenizer, texts)
        folder = save_for_check(rb.working, rb.target.tokenizer, tmp_path / "tp", {})
        device = next(rb.working.parameters()).device  # where ref was scored (CUDA when present)
        good = reload_check(folder, texts, ref["ppl"], ref["per_text_nll"], device, "float32")
        assert good["passed"] and good["weight_hash_matches_card"], good
        f = folder / "model.safetensors"
        state = load_file(str(f))
        key = next(k for k in state if k.endswith("mlp.c_fc.weight"))
        state[key] = state[key] + 0.05
        save_file(state, str(f), metadata={"format": "pt"})
        bad = reload_check(folder, texts, ref["ppl"], ref["per_text_nll"], device, "float32")
        assert not bad["passed"] and bad["max_abs_loss_change"] > 0 and not bad["weight_hash_matches_card"], (
            bad
        )
    finally:
        rb.undo()
