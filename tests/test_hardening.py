"""Hostile input: non-finite numbers, strict JSON, output paths checked before any model loads,
texts longer than a model's context, and the CLI's exit codes (0 ok, 2 bad input, 1 bug)."""

from __future__ import annotations

import json
import os

import pytest

from engine.cli import main
from engine.core.errors import GraftError
from engine.core.params import RunOptions, build_params, param_specs
from engine.running.actions import MakeDonorParams
from engine.running.registry import all_tools


def strict_load(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def run_cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    err = capsys.readouterr().err
    return rc, err


def error_lines(err: str) -> list[str]:
    return [l for l in err.strip().splitlines() if l.startswith("error")]


# --------------------------------------------------------------------------- non-finite numbers
PARAM_CLASSES = [RunOptions, MakeDonorParams] + [t.params_cls for t in all_tools()]
FLOAT_PARAMS = [(cls, s) for cls in dict.fromkeys(PARAM_CLASSES) for s in param_specs(cls) if s.type is float]


@pytest.mark.parametrize("cls,spec", FLOAT_PARAMS, ids=[f"{c.__name__}.{s.name}" for c, s in FLOAT_PARAMS])
@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", "Infinity", float("nan"), float("inf")])
def test_every_float_parameter_refuses_non_finite_values(cls, spec, bad):
    with pytest.raises(GraftError, match=spec.flag) as e:
        build_params(cls, {spec.name: bad})
    assert "finite" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "cls,spec", [(c, s) for c in dict.fromkeys(PARAM_CLASSES) for s in param_specs(c) if s.type is int]
)
def test_int_parameters_refuse_nan_and_fractions(cls, spec):
    for bad in ("nan", "inf", "2.5", "", True):
        with pytest.raises(GraftError, match=spec.flag):
            build_params(cls, {spec.name: bad})


def test_int_parameters_accept_integral_spellings():
    assert build_params(RunOptions, {"max_tokens": "1e3"}).max_tokens == 1000
    assert build_params(RunOptions, {"max_tokens": 64.0}).max_tokens == 64


@pytest.mark.parametrize(
    "args,flag",
    [
        (["procrustes", "--heldout-fraction", "nan"], "--heldout-fraction"),
        (["procrustes", "--ridge-alpha", "inf"], "--ridge-alpha"),
        (["cka", "--outlier-factor", "nan"], "--outlier-factor"),
        (["bridge-check", "--epsilon-threshold", "nan"], "--epsilon-threshold"),
        (["bridge-check", "--ridge-alpha=-inf"], "--ridge-alpha"),
    ],
)
def test_cli_non_finite_is_one_line_exit_2(capsys, args, flag):
    rc, err = run_cli(
        capsys, *args[:1], "--donor", "tiny-gpt2-a", "--target", "tiny-gpt2-b", *args[1:], "--quiet"
    )
    assert rc == 2
    lines = error_lines(err)
    assert len(lines) == 1 and flag in lines[0] and "finite" in lines[0] and "internal" not in lines[0]


def test_make_donor_lr_nan_is_refused_before_loading(capsys, tmp_path, sets, monkeypatch):
    import engine.loading.models

    monkeypatch.setattr(
        engine.loading.models.ModelStore, "get", lambda *a, **k: pytest.fail("a model was loaded")
    )
    for flag, value in (("--lr", "nan"), ("--lr", "inf"), ("--replay-fraction", "nan"), ("--steps", "nan")):
        rc, err = run_cli(
            capsys,
            "make-donor",
            "--base",
            "tiny-gpt2-a",
            "--concept",
            sets["concept"],
            "--out",
            str(tmp_path / "d"),
            flag,
            value,
            "--quiet",
        )
        assert rc == 2, err
        assert flag in error_lines(err)[0]
    assert not (tmp_path / "d").exists()


def test_make_donor_defaults_match_the_trainer():
    from engine.adapters import donor

    p = build_params(MakeDonorParams)
    assert (p.steps, p.rank, p.lr, p.replay_fraction) == (
        donor.DEFAULT_STEPS,
        donor.DEFAULT_RANK,
        donor.DEFAULT_LR,
        donor.DEFAULT_REPLAY_FRACTION,
    )


# --------------------------------------------------------------------------- strict JSON
def test_strict_replaces_non_finite_and_says_where():
    from engine.core.jsonsafe import dumps, strict

    clean, where = strict({"a": [1.0, float("nan")], "b": {"c": float("-inf")}, "d": (2, "x")}, "result")
    assert clean == {"a": [1.0, None], "b": {"c": None}, "d": [2, "x"]}
    assert where == ["result.a[1]", "result.b.c"]
    assert strict_load(dumps({"x": float("inf")})) == {"x": None}


def test_run_tool_writes_null_and_a_note_for_an_undefined_number(workload, monkeypatch):
    """A tool that produces NaN (here: a patched T1) yields strict JSON with the field listed."""
    import engine.tools.compat as compat
    from engine.loading.models import ModelSpec
    from engine.running.runner import run_tool

    real = compat.TOOL.compute

    def nan_compute(ctx, params, progress):
        res = real(ctx, params, progress)
        res.tokenizer_overlap = float("nan")
        return res

    import dataclasses

    import engine.running.registry as reg

    patched = dataclasses.replace(compat.TOOL, compute=nan_compute)

    monkeypatch.setitem(reg._REGISTRY, "compat", patched)
    env = run_tool(
        "compat", ModelSpec.parse("tiny-gpt2-a"), ModelSpec.parse("tiny-gpt2-b"), {"workload": workload}
    )
    assert env["result"]["tokenizer_overlap"] is None
    assert "result.tokenizer_overlap" in env["meta"]["undefined_values"]
    assert any("undefined" in n for n in env["meta"]["notes"])
    strict_load(json.dumps(env))


# --------------------------------------------------------------------------- output paths first
@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any model is loaded: bad paths must be refused before."""
    import engine.loading.models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the output path was checked")

    monkeypatch.setattr(engine.loading.models, "load_model", refuse)


@pytest.mark.parametrize(
    "make_path,needle",
    [
        (lambda tmp: str(tmp), "is a folder"),
        (lambda tmp: "/proc/graft-test/out.json", "cannot"),
        (lambda tmp: "/proc/out.json", "cannot write"),
        (lambda tmp: str(tmp / "file.txt" / "out.json"), "is a file"),
    ],
)
def test_bad_json_path_fails_before_loading_and_records_nothing(
    capsys, tmp_path, no_loading, make_path, needle
):
    from engine.running.history import History

    (tmp_path / "file.txt").write_text("x")
    before = set(os.listdir(tmp_path))
    rc, err = run_cli(
        capsys,
        "cka",
        "--donor",
        "tiny-gpt2-a",
        "--target",
        "tiny-gpt2-b",
        "--json",
        make_path(tmp_path),
        "--quiet",
    )
    assert rc == 2, err
    assert needle in error_lines(err)[0]
    assert set(os.listdir(tmp_path)) == before  # no stray .tmp or probe file
    assert History().list() == []  # no run recorded as done (or at all)


def test_bad_save_folder_fails_before_loading(capsys, tmp_path, no_loading):
    for save in ("/proc/graft-x", str(tmp_path / "f.txt")):
        (tmp_path / "f.txt").write_text("x")
        rc, err = run_cli(
            capsys, "swap", "--donor", "tiny-gpt2-a", "--target", "tiny-gpt2-b", "--save", save, "--quiet"
        )
        assert rc == 2, err
        assert "--save" in error_lines(err)[0]


def test_missing_concept_file_fails_before_loading(capsys, tmp_path, no_loading):
    rc, err = run_cli(
        capsys,
        "sweep-k",
        "--donor",
        "tiny-gpt2-a",
        "--target",
        "tiny-gpt2-b",
        "--concept",
        str(tmp_path / "none.jsonl"),
        "--quiet",
    )
    assert rc == 2 and "--concept" in error_lines(err)[0] and "not found" in err


def test_existing_json_is_not_clobbered_and_no_tmp_is_left(capsys, tmp_path, workload):
    out = tmp_path / "out.json"
    out.write_text('{"keep": true}')
    rc, _ = run_cli(
        capsys, "cka", "--donor", "tiny-gpt2-a", "--target", "no-such-model", "--json", str(out), "--quiet"
    )
    assert rc == 2
    assert json.loads(out.read_text()) == {"keep": True}
    rc, err = run_cli(
        capsys,
        "cka",
        "--donor",
        "tiny-gpt2-a",
        "--target",
        "tiny-gpt2-b",
        "--workload",
        workload,
        "--max-tokens",
        "64",
        "--json",
        str(out),
        "--quiet",
    )
    assert rc == 0, err
    env = strict_load(out.read_text())
    assert env["run_id"] and env["tool"] == "cka"
    assert sorted(os.listdir(tmp_path)) == ["out.json", "workload.txt"]  # no .tmp or probe file left


# --------------------------------------------------------------------------- long texts
@pytest.fixture
def huge_text_workload(tmp_path) -> str:
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa " * 4000)[:200_000]
    p = tmp_path / "huge.txt"
    p.write_text(words + "\nA short second text about the river.\n")
    return str(p)


@pytest.mark.parametrize("tool", ["cka", "procrustes", "rank-modules"])
def test_a_200k_character_text_is_cut_to_the_models_context(tool, huge_text_workload, one_thread):
    from engine.loading.models import ModelSpec
    from engine.running.runner import run_tool

    env = run_tool(
        tool,
        ModelSpec.parse("tiny-gpt2-a"),
        ModelSpec.parse("tiny-gpt2-b"),
        {"workload": huge_text_workload, "max_tokens": 4000},
    )
    notes = " ".join(env["meta"].get("notes", []))
    assert env["meta"]["n_texts_cut"] == 1
    assert "cut to their first 254 tokens" in notes  # tiny GPT-2: 256 positions, 2 kept for specials


def test_evaluation_of_a_huge_question_and_fact_fits_the_context(tmp_path, one_thread):
    from engine.loading.models import ModelSpec
    from engine.running.runner import run_tool

    long = "why " * 50_000
    concept = tmp_path / "c.jsonl"
    concept.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"kind": "fact", "text": "The river flows north. " * 5000},
                {"kind": "qa", "question": long + "does the river flow?", "answer": "north", "split": "test"},
                {"kind": "qa", "question": "Where?", "answer": "north " * 400, "split": "test"},
            ]
        )
        + "\n"
    )
    env = run_tool(
        "swap",
        ModelSpec.parse("tiny-gpt2-a"),
        ModelSpec.parse("tiny-gpt2-b"),
        {"workload": str(concept)},
        {"k": 2, "concept": str(concept), "retained": str(concept), "max_new_tokens": 4},
    )
    r = env["result"]
    assert r["n_test_items"] == 2 and r["before"]["ppl_concept"] is not None
    strict_load(json.dumps(env))


def test_context_length_reads_the_config():
    from engine.loading.tiny import build_tiny
    from engine.loading.tokens import context_length, fit_prompt

    model, _ = build_tiny("tiny-llama-a")
    assert context_length(model) == 256
    assert fit_prompt(list(range(10)), 4) == [6, 7, 8, 9]
    with pytest.raises(GraftError):
        fit_prompt([1, 2], 0)


# --------------------------------------------------------------------------- exit codes
def test_exit_codes_ok_bad_input_bug(capsys, workload, monkeypatch, tmp_path):
    assert (
        main(
            [
                "compat",
                "--donor",
                "tiny-gpt2-a",
                "--target",
                "tiny-gpt2-b",
                "--workload",
                workload,
                "--quiet",
                "--json",
                str(tmp_path / "ok.json"),
            ]
        )
        == 0
    )
    assert main(["compat", "--donor", "tiny-gpt2-a", "--target", "nope", "--quiet"]) == 2
    import engine.running.runner

    def boom(*a, **k):
        raise ZeroDivisionError("planted bug")

    monkeypatch.setattr(engine.running.runner, "run_tool", boom)
    capsys.readouterr()
    assert main(["compat", "--donor", "tiny-gpt2-a", "--target", "tiny-gpt2-b", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: internal: ZeroDivisionError: planted bug")
    from engine.running.history import History

    assert History().list()[0]["status"] == "failed"
