"""Inputs a new user or an attacker brings: output paths that are devices, links or pipes; workloads
of one token or of one text repeated; a tokenizer larger than its model's vocabulary; empty lists;
a question longer than the model's context. Each gets one clear line (or a note), never a crash,
a wrong number or a destroyed file."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from engine.cli import main, write_text_atomic
from engine.core.errors import GraftError
from engine.core.outputs import check_input_file
from engine.running.runner import run_tool

pytestmark = pytest.mark.usefixtures("one_thread")


def _m(name: str):
    from engine.loading.models import ModelSpec, ModelStore

    return ModelStore().get(ModelSpec.parse(name), "cpu")


def _cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_json_to_a_device_writes_through_and_never_replaces_it(tmp_path):
    write_text_atomic("/dev/null", '{"a": 1}', "--json")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # still the device, not a regular file


def test_json_through_a_link_writes_the_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "target.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_text_atomic(str(link), "new", "--json")
    assert link.is_symlink() and target.read_text() == "new"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640  # an existing file keeps its permissions


def test_new_output_files_get_the_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(str(tmp_path / "fresh.json"), "{}", "--json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "fresh.json").st_mode) == 0o644


def test_pipes_are_refused_as_outputs_and_inputs_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(GraftError, match="not a regular file"):
        write_text_atomic(str(fifo), "x", "--json")
    with pytest.raises(GraftError, match="not a regular file"):
        check_input_file(str(fifo), "--workload")  # reading it would wait forever for a writer
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_cka_on_a_one_token_workload_is_refused_not_zero(tmp_path):
    wl = tmp_path / "one.txt"
    wl.write_text("x\n")
    with pytest.raises(GraftError, match="too few aligned rows for CKA"):
        run_tool("cka", _m("tiny-gpt2-a"), _m("tiny-gpt2-a"), {"workload": str(wl)})


def test_repeated_texts_are_dropped_once_with_a_note(tmp_path, workload):
    """One text 50 times is one text: copies on both sides of the split made T3's held-out score of
    two unrelated random models 0.95 (0.13 on distinct texts)."""
    texts = open(workload).read().splitlines()
    dup = tmp_path / "dup.txt"
    dup.write_text("\n".join(texts + texts[:3] * 5) + "\n")
    a = run_tool("procrustes", _m("tiny-gpt2-a"), _m("tiny-llama-a"), {"workload": workload})
    b = run_tool("procrustes", _m("tiny-gpt2-a"), _m("tiny-llama-a"), {"workload": str(dup)})
    assert b["meta"]["n_texts_duplicate"] == 15 and any("repeated" in n for n in b["meta"]["notes"])
    assert b["result"] == a["result"]  # the same texts, the same numbers
    assert "n_texts_duplicate" not in a["meta"]


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_at_load(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from engine.loading.models import ModelSpec, load_model
    from engine.loading.tiny import build_tiny

    _, tok = build_tiny("tiny-llama-a")
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(
            num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=50
        )
    )
    model.save_pretrained(str(tmp_path / "m"))
    tok.save_pretrained(str(tmp_path / "m"))
    with pytest.raises(
        GraftError, match=f"tokenizer has {len(tok)} tokens but the model's embedding table only 50 rows"
    ):
        load_model(ModelSpec.parse(str(tmp_path / "m")), "cpu")


def test_empty_lists_are_refused_not_silently_defaulted(capsys, tiny_organ, workload):
    rc, err = _cli(
        capsys,
        "position-sweep",
        "--organ",
        tiny_organ["path"],
        "--target",
        "tiny-gpt2-b",
        "--positions",
        ",,,",
        "--workload",
        workload,
        "--quiet",
    )
    assert rc == 2 and "--positions names nothing" in err
    rc, err = _cli(
        capsys,
        "swap",
        "--donor",
        "tiny-gpt2-a",
        "--target",
        "tiny-gpt2-b",
        "--modules",
        " , ,",
        "--workload",
        workload,
        "--quiet",
    )
    assert rc == 2 and "--modules names nothing" in err


def test_a_negative_list_value_gets_a_hint(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep-k", "--k-grid", "-1,2"])
    assert e.value.code == 2
    assert "--k-grid=VALUE" in capsys.readouterr().err


def test_attribution_refuses_a_question_longer_than_the_context():
    from engine.evaluation.attribution import attribute
    from engine.loading.models import ModelSpec, ModelStore

    m = ModelStore().get(ModelSpec.parse("tiny-gpt2-a"), "cpu")
    ctx = m.model.config.n_positions
    with pytest.raises(GraftError, match=f"more than the model's context of {ctx} positions"):
        attribute(m.model, m.tokenizer, "fox " * (ctx + 10), "dog", steps=2)
    rep = attribute(m.model, m.tokenizer, "The quick brown fox", "jumps", steps=2)  # a short one still runs
    assert torch.isfinite(torch.tensor(rep["matrix"])).all()


def test_seed_beyond_64_bits_is_one_line(capsys, workload):
    rc, err = _cli(
        capsys,
        "bridge-check",
        "--donor",
        "tiny-gpt2-a",
        "--target",
        "tiny-gpt2-b",
        "--workload",
        workload,
        "--seed",
        "99999999999999999999",
        "--quiet",
    )
    assert rc == 2 and "--seed must be <=" in err and "internal" not in err


def test_saved_folders_are_readable_like_any_new_file(tmp_path):
    """safetensors writes its files 0600: a saved organ or model folder must not stay unreadable to the
    other users of a shared machine (new files here get 0666 less the umask)."""
    from engine.core.paths import replace_dir, staging_dir
    from engine.surgery.organ import extract_organ, save_organ

    old = os.umask(0o022)
    try:
        out = save_organ(extract_organ(_m("tiny-gpt2-a"), 1, 1), tmp_path / "organ")
        tmp = staging_dir(tmp_path / "folder")
        (tmp / "weights.bin").write_bytes(b"x")
        os.chmod(tmp / "weights.bin", 0o600)
        replace_dir(tmp, tmp_path / "folder")
    finally:
        os.umask(old)
    modes = {
        p.name: stat.S_IMODE(os.stat(p).st_mode)
        for p in [*out.iterdir(), tmp_path / "folder" / "weights.bin"]
    }
    assert set(modes.values()) == {0o644}, modes


def test_jsonl_lines_end_at_newlines_only_and_surrogates_are_refused(tmp_path):
    from engine.core.data import load_workload

    ok = tmp_path / "u2028.jsonl"
    ok.write_text('{"text": "first\u2028still the first"}\n{"text": "second\u0085too"}\n', encoding="utf-8")
    assert load_workload(str(ok)).texts == ("first\u2028still the first", "second\u0085too")
    bad = tmp_path / "surrogate.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "Tavrenne \\ud800 island."}\n', encoding="utf-8")
    with pytest.raises(GraftError, match="surrogate.jsonl:2: a string holds a lone surrogate"):
        load_workload(str(bad))


def test_cache_keys_of_text_lists_do_not_collide():
    """One text holding the old separator (0x1E) hashed as two texts: a retained set ["A\\x1eB"] took the
    concept set ["A", "B"]'s cached perplexity."""
    from engine.core.data import texts_sha256

    assert texts_sha256(["A\x1eB"]) != texts_sha256(["A", "B"])
    assert texts_sha256([["q\x1fa", "b"]]) != texts_sha256([["q", "a\x1fb"]])


def test_cka_on_fewer_rows_than_the_width_warns(tmp_path):
    """Two unrelated random models: CKA runs high on a handful of rows (biased upwards when n < d), so the
    result must say so; on the shared workload (more rows than the width) it stays quiet."""
    wl = tmp_path / "few.txt"
    wl.write_text("Paris is the capital of France.\n")
    few = run_tool("cka", _m("tiny-gpt2-a"), _m("tiny-llama-a"), {"workload": str(wl)})["result"]
    assert few["n_rows"] < 64 and len(few["warnings"]) == 1 and "biased upwards" in few["warnings"][0]
    assert few["estimator"] == "debiased" and "debiased CKA" in few["warnings"][0]
    from engine.tools.cka import cka_warnings

    assert cka_warnings(64, 64, 48) == [] and cka_warnings(63, 64, 48)


def test_a_long_reference_answer_keeps_its_question_in_the_graded_score():
    """An answer longer than the context used to take all of it but one token: every question then
    scored the same. Now the prompt keeps at least half the context."""
    from engine.evaluation.scoring import graded_score

    m = _m("tiny-gpt2-a")
    long = "word " * 600
    r = graded_score(
        m.model,
        m.tokenizer,
        [
            {"question": "What is the capital of France?", "answer": long},
            {"question": "Name a river in Egypt, please?", "answer": long},
        ],
    )
    a, b = r["items"]
    assert a["prob"] != b["prob"]
    assert 0 < len(a["token_probs"]) < m.model.config.n_positions


def test_a_prompt_cut_inside_a_character_shows_no_replacement_character():
    """T12 cuts retained prompts after a fixed number of tokens; a CJK character is several byte-level
    tokens, so the prompt ended in U+FFFD and the continuation began with one."""
    from engine.evaluation.interference import _split_decode
    from engine.loading.tiny import build_tiny

    _, tok = build_tiny("tiny-gpt2-a")
    text = "塔夫伦的首都是东京"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode(ids[:cut]) for cut in range(1, len(ids)))  # the old display did show it
    for cut in range(1, len(ids)):
        prompt, rest = _split_decode(tok, ids[:cut], ids[cut:])
        assert prompt + rest == text and "\ufffd" not in prompt + rest


def test_a_concept_set_without_test_questions_fails_before_any_model_loads(tmp_path, monkeypatch):
    import engine.loading.models as models

    bad = tmp_path / "train_only.jsonl"
    bad.write_text(
        '{"kind": "fact", "text": "Kessaloon is the capital of Veyra."}\n'
        '{"kind": "qa", "question": "What is the capital of Veyra?", "answer": "Kessaloon", "split": '
        '"train"}\n'
    )

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the concept set was checked")

    monkeypatch.setattr(models.ModelStore, "get", no_loading)
    for tool in ("swap", "sweep-k"):
        with pytest.raises(GraftError, match="has no test questions"):
            run_tool(tool, _spec("tiny-gpt2-a"), _spec("tiny-gpt2-b"), params={"concept": str(bad)})


def _spec(name: str):
    from engine.loading.models import ModelSpec

    return ModelSpec.parse(name)


def test_make_donor_refuses_a_concept_set_with_nothing_to_learn_before_loading(tmp_path):
    from engine.core.params import build_params
    from engine.running.actions import MakeDonorParams, check_make_donor

    test_only = tmp_path / "test_only.jsonl"
    test_only.write_text(
        '{"kind": "qa", "question": "What is the capital of Veyra?", "answer": "Kessaloon", "split": '
        '"test"}\n'
    )
    params = build_params(MakeDonorParams, {"concept": str(test_only), "out": str(tmp_path / "donor")})
    with pytest.raises(GraftError, match="has no facts or train questions to learn from"):
        check_make_donor(params)
    assert not (tmp_path / "donor").exists()
