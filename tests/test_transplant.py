"""Module swap mechanics (engine.surgery.transplant) and the evaluation cache (engine.evaluation.evalcache).

Ground truth: rollback restores every tensor bit for bit, the cached target is never written,
the working copy costs only the swapped bytes, a saved transplant reloads with identical logits.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from engine.core.data import load_concept_set
from engine.core.errors import GraftError
from engine.evaluation import evalcache
from engine.evaluation.beforeafter import transfer_metrics
from engine.loading.arch import ArchAdapter
from engine.loading.models import LoadedModel, ModelSpec, load_model
from engine.loading.tiny import build_tiny
from engine.surgery.reversible import extra_storage_bytes
from engine.surgery.transplant import (
    SURGERY_CARD,
    ModuleSwap,
    check_swap_pair,
    save_transplant,
    swappable_modules,
)

PAIRS = {"gpt2": ("tiny-gpt2-a", "tiny-gpt2-b"), "llama": ("tiny-llama-a", "tiny-llama-b")}


@pytest.fixture(scope="module")
def models():
    return {
        k: (load_model(ModelSpec.parse(d), "cpu"), load_model(ModelSpec.parse(t), "cpu"))
        for k, (d, t) in PAIRS.items()
    }


def _names(donor, target, n):
    mods, skipped = swappable_modules(donor, target)
    assert not skipped
    # Spread over blocks and kinds: every 3rd module.
    return [m.name for m in mods][::3][:n]


def _ids(loaded):
    return torch.tensor([loaded.tokenizer("The river flows north through the valley.")["input_ids"]])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_working_copy_shares_all_but_swapped_tensors(models, family):
    donor, target = models[family]
    swap = ModuleSwap(target, donor, _names(donor, target, 4))
    working = swap.materialise()
    assert working is not target.model
    assert swap.materialise() is working  # idempotent
    cached = {p.data_ptr() for p in target.model.parameters()}
    touched = {
        getattr(target.arch.module(swap.linear[n].path), t).data_ptr()
        for n in swap.modules
        for t in ("weight", "bias")
        if getattr(target.arch.module(swap.linear[n].path), t, None) is not None
    }
    for name, p in working.named_parameters():
        if p.data_ptr() in cached:
            assert p.data_ptr() not in touched, name
    # Extra memory = bytes of the swapped tensors (here exactly; the budget is 10%).
    extra = swap.extra_bytes()
    assert swap.swapped_bytes > 0
    assert extra / swap.swapped_bytes <= 1.1
    assert extra == extra_storage_bytes(working, target.model)
    swap.apply()
    assert swap.extra_bytes() / swap.swapped_bytes <= 1.1  # applying writes in place: no new storage
    swap.rollback()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rollback_is_bit_exact_and_apply_again_works(models, family):
    donor, target = models[family]
    h_target = target.state_hash()
    swap = ModuleSwap(target, donor, _names(donor, target, 5))
    swap.materialise()
    assert swap.hash_before() == h_target == swap.weight_hash()
    assert swap.apply() == swap.modules
    assert swap.applied == swap.modules
    h_after = swap.weight_hash()
    assert h_after != h_target
    # The swapped tensors now hold the donor's bytes (Conv1D copied as stored), the rest the target's.
    for n in swap.modules:
        w = getattr(swap.working.get_submodule(swap.linear[n].path), "weight")
        assert torch.equal(w, donor.arch.module(swap.linear[n].path).weight)
    assert swap.rollback() > 0
    assert swap.applied == ()
    assert swap.weight_hash() == h_target
    assert swap.verify_rollback()
    ws, ts = swap.working.state_dict(), target.model.state_dict()
    assert all(torch.equal(ws[k], ts[k]) for k in ts)
    assert torch.equal(swap.working(_ids(target)).logits, target.model(_ids(target)).logits)
    swap.apply()
    assert swap.weight_hash() == h_after
    swap.rollback()
    # A subset, then the rest on top, then one rollback.
    swap.apply(swap.modules[:2])
    assert swap.applied == swap.modules[:2]
    swap.apply()
    assert swap.weight_hash() == h_after
    swap.rollback()
    assert swap.weight_hash() == h_target
    assert target.state_hash() == h_target  # the cached target was never written


def test_swapping_every_module_of_an_identical_architecture_reproduces_the_donor_blocks(models):
    donor, target = models["llama"]
    mods, _ = swappable_modules(donor, target)
    swap = ModuleSwap(target, donor, [m.name for m in mods])
    swap.apply()
    for m in mods:
        assert torch.equal(swap.working.get_submodule(m.path).weight, donor.arch.module(m.path).weight)
    swap.rollback()
    assert swap.verify_rollback()


def test_swap_refuses_mismatched_shapes_and_unknown_modules(models):
    gpt2, _ = models["gpt2"]
    llama, _ = models["llama"]
    with pytest.raises(GraftError, match="same family"):
        check_swap_pair(gpt2, llama)
    with pytest.raises(GraftError, match="Conv1D vs Linear"):
        ModuleSwap(llama, gpt2, ["blocks.0.attn.o"])
    with pytest.raises(GraftError, match="not a linear module"):
        ModuleSwap(llama, llama, ["blocks.99.attn.o"])
    with pytest.raises(GraftError, match="no modules"):
        ModuleSwap(llama, llama, [" ", ""])
    # Same family, different MLP width: the MLP is refused, attention is fine.
    _, tok = build_tiny("tiny-llama-a")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=len(tok),
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    wide = AutoModelForCausalLM.from_config(cfg).eval()
    other = LoadedModel(
        ModelSpec("builtin", "tiny-llama-a"),
        wide,
        tok,
        ArchAdapter(wide),
        torch.device("cpu"),
        torch.float32,
        "",
    )
    with pytest.raises(GraftError, match="weight shapes differ"):
        ModuleSwap(llama, other, ["blocks.1.mlp.up"])
    ModuleSwap(llama, other, ["blocks.1.attn.q"])
    ok, skipped = swappable_modules(other, llama)
    assert {s["name"] for s in skipped} == {
        f"blocks.{l}.mlp.{k}" for l in range(4) for k in ("up", "gate", "down")
    }


# --------------------------------------------------------------------------------------------- TIR / Recovery


def _strict(x):
    return json.loads(json.dumps(x, allow_nan=False))


def test_transfer_metrics_defined_case():
    m = transfer_metrics(0.2, 0.5, 0.6)
    assert m["tir"] == pytest.approx(2.5) and m["recovery"] == pytest.approx(0.75)
    assert m["tir_status"] == m["recovery_status"] == "ok"
    assert transfer_metrics(0.2, 0.6, 0.6)["recovery"] == 1.0


def test_transfer_metrics_target_score_zero():
    m = _strict(transfer_metrics(0.0, 0.4, 0.8))
    assert (
        m["tir"] is None
        and m["tir_status"] == "undefined"
        and "S(T) = 0" in m["tir_note"]
        and "infinite" in m["tir_note"]
    )
    assert m["recovery"] == pytest.approx(0.5)
    m = _strict(transfer_metrics(0.0, 0.0, 0.0))
    assert m["tir"] is None and "0/0" in m["tir_note"]
    assert m["recovery"] is None and "S(D) = S(T)" in m["recovery_note"]


def test_transfer_metrics_donor_equals_target():
    m = _strict(transfer_metrics(0.3, 0.5, 0.3))
    assert (
        m["recovery"] is None
        and m["recovery_status"] == "undefined"
        and "nothing to recover" in m["recovery_note"]
    )
    assert m["tir"] == pytest.approx(0.5 / 0.3)


def test_transfer_metrics_non_finite_scores():
    m = _strict(transfer_metrics(float("nan"), 0.5, float("inf")))
    assert m["tir"] is None and m["recovery"] is None and m["tir_note"] and m["recovery_note"]


# --------------------------------------------------------------------------------------------- saving


def test_saved_transplant_reloads_with_identical_logits(models, tmp_path):
    donor, target = models["gpt2"]
    swap = ModuleSwap(target, donor, _names(donor, target, 3))
    swap.apply()
    card = {
        "operation": "module-swap",
        "donor": donor.spec.ref,
        "target": target.spec.ref,
        "modules": list(swap.modules),
        "parameters": {"k": 3},
        "results": {"tir": None, "recovery": 0.5},
        "hashes": {"transplanted": swap.weight_hash()},
    }
    out = save_transplant(swap.working, target.tokenizer, tmp_path / "tp", card)
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    saved = json.loads((out / SURGERY_CARD).read_text())
    for key in (
        "format",
        "operation",
        "donor",
        "target",
        "modules",
        "parameters",
        "results",
        "hashes",
        "saved_weight_hash",
    ):
        assert key in saved
    assert saved["modules"] == list(swap.modules) and saved["saved_weight_hash"] == swap.weight_hash()
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = _ids(target)
    assert tok("The river flows north through the valley.")["input_ids"] == ids[0].tolist()
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, swap.working(ids).logits)
    # A Graft transplant folder may be replaced by a new one.
    save_transplant(swap.working, target.tokenizer, out, {**card, "parameters": {"k": 4}})
    assert json.loads((out / SURGERY_CARD).read_text())["parameters"] == {"k": 4}
    assert [p.name for p in tmp_path.iterdir()] == ["tp"]  # no temporary folders left behind
    swap.rollback()


def test_save_refuses_a_folder_with_foreign_files(models, tmp_path):
    donor, target = models["llama"]
    swap = ModuleSwap(target, donor, _names(donor, target, 1))
    swap.apply()
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(GraftError, match="not a Graft transplant"):
        save_transplant(swap.working, target.tokenizer, folder, {"operation": "module-swap"})
    assert (folder / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(GraftError, match="not a folder"):
        save_transplant(swap.working, target.tokenizer, tmp_path / "file", {"operation": "module-swap"})
    with pytest.raises(GraftError, match="strict JSON"):
        save_transplant(swap.working, target.tokenizer, tmp_path / "new", {"results": float("nan")})
    assert not (tmp_path / "new").exists()
    swap.rollback()


# --------------------------------------------------------------------------------------------- evaluation
# cache


@pytest.fixture(scope="module")
def small_sets(sets):
    return load_concept_set(sets["concept"]), load_concept_set(sets["retained"])


def test_evaluate_model_is_cached_by_weight_hash(models, small_sets):
    donor, target = models["llama"]
    evalcache.clear_cache()
    a = evalcache.evaluate_model(
        target.model, target.tokenizer, *small_sets, score="graded", max_new_tokens=4
    )
    info = evalcache.cache_info()
    assert {"ppl_concept", "ppl_retained", "task_score", "task_score_exact", "task_score_graded"} <= set(a)
    assert a["task_score"] == a["task_score_graded"] and 0 < a["task_score_graded"] < 1
    assert a["n_test_items"] == 2
    # A different object with the same weights is the same state: no second evaluation.
    twin = load_model(target.spec, "cpu")
    b = evalcache.evaluate_model(twin.model, twin.tokenizer, *small_sets, score="exact", max_new_tokens=4)
    assert evalcache.cache_info()["misses"] == info["misses"]
    assert b["task_score"] == b["task_score_exact"] == a["task_score_exact"]
    assert {k: v for k, v in a.items() if k not in ("score_kind", "task_score")} == {
        k: v for k, v in b.items() if k not in ("score_kind", "task_score")
    }
    with pytest.raises(GraftError, match="score must be"):
        evalcache.evaluate_model(target.model, target.tokenizer, *small_sets, score="bleu")


def test_the_exact_score_counts_the_answers_the_model_really_gives(models, sets, tmp_path):
    """Ground truth from transformers' own greedy ``generate``: one test item's reference is the
    model's own continuation, the other's a word it cannot produce, so the exact score is 1/2."""
    import json

    from engine.core.data import load_concept_set
    from engine.loading.tokens import encode_prompt

    _, target = models["llama"]
    tok, model = target.tokenizer, target.model
    question = "Where does the river flow?"
    ids = torch.tensor([encode_prompt(tok, question)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    own = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    words = [w for w in own.split() if any(c.isalnum() for c in w)]
    assert words, f"the tiny model's greedy continuation has no word to match ({own!r})"
    concept = tmp_path / "exact.jsonl"
    concept.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"kind": "fact", "text": "The river flows north."},
                {"kind": "qa", "question": question, "answer": words[0], "split": "test"},
                {
                    "kind": "qa",
                    "question": "How many movements did the symphony have?",
                    "answer": "qqxqzv",
                    "split": "test",
                },
            ]
        )
        + "\n"
    )
    evalcache.clear_cache()
    got = evalcache.evaluate_model(
        model,
        tok,
        load_concept_set(concept),
        load_concept_set(sets["retained"]),
        score="exact",
        max_new_tokens=4,
    )
    assert got["task_score_exact"] == 0.5


def test_alignment_score_and_generations(models, small_sets):
    donor, target = models["llama"]
    qs = [q.question for q in small_sets[0].test_qa()]
    same = evalcache.alignment_score(target.model, target.tokenizer, target.model, target.tokenizer, qs)
    assert same["score"] == 1.0 and same["n_positions"] > 0
    other = evalcache.alignment_score(donor.model, donor.tokenizer, target.model, target.tokenizer, qs)
    assert 0.0 <= other["score"] < 1.0
    gpt2, _ = models["gpt2"]
    # different tokenizers: next words at word ends, not next-token ids (tests/test_word_agreement.py)
    cross = evalcache.alignment_score(gpt2.model, gpt2.tokenizer, target.model, target.tokenizer, qs)
    assert same["level"] == "token" and cross["level"] == "word" and 0.0 <= cross["score"] <= 1.0
    assert 0 < cross["n_positions"] <= sum(len(q.split()) for q in qs)
    g1 = evalcache.generations(target.model, target.tokenizer, qs, 4)
    g2 = evalcache.generations(target.model, target.tokenizer, qs, 4)
    assert g1 == g2 and len(g1) == 2 and all(isinstance(g, str) for g in g1)
