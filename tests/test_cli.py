"""CLI contract from the issue: fields in --json, and bad input -> one line on stderr, exit != 0."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, cwd=ROOT)


def test_cka_fields(workload, tmp_path):
    out = tmp_path / "cka.json"
    p = cli(
        "cka",
        "--donor",
        "tiny-gpt2-a",
        "--target",
        "tiny-gpt2-b",
        "--workload",
        workload,
        "--max-tokens",
        "64",
        "--device",
        "cpu",
        "--json",
        str(out),
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())["result"]
    assert len(r["matrix"]) == 4 and len(r["matrix"][0]) == 4
    assert all(len(pair) == 2 for pair in r["matching"])


def test_procrustes_and_compat_fields(workload, tmp_path):
    out = tmp_path / "p.json"
    assert (
        cli(
            "procrustes",
            "--donor",
            "tiny-llama-a",
            "--target",
            "tiny-llama-b",
            "--workload",
            workload,
            "--json",
            str(out),
        ).returncode
        == 0
    )
    layers = json.loads(out.read_text())["result"]["layers"]
    assert {"donor_layer", "target_layer", "residual_fit", "residual_heldout", "residual_ridge"} <= set(
        layers[0]
    )
    assert (
        cli(
            "compat",
            "--donor",
            "tiny-llama-a",
            "--target",
            "tiny-gpt2-b",
            "--workload",
            workload,
            "--json",
            str(out),
        ).returncode
        == 0
    )
    r = json.loads(out.read_text())["result"]
    assert set(r["verdicts"]) == {"module_swap", "organ_direct", "organ_bridged", "conjugation"}
    assert r["reasons"] and r["signature"]


def test_runs_are_recorded_in_history(workload, tmp_path):
    from engine.running.history import History

    assert (
        cli("compat", "--donor", "tiny-gpt2-a", "--target", "tiny-gpt2-b", "--workload", workload).returncode
        == 0
    )
    runs = History().list()
    assert runs and runs[0]["tool"] == "compat" and runs[0]["status"] == "done" and runs[0]["source"] == "cli"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["cka", "--donor", "/no/such/folder", "--target", "tiny-gpt2-b"], "model path not found"),
        (["cka", "--donor", "no-such-model", "--target", "tiny-gpt2-b"], "unknown model"),
        (
            ["cka", "--donor", "tiny-gpt2-a", "--target", "tiny-gpt2-b", "--workload", "/no/such.jsonl"],
            "not found",
        ),
        (["cka", "--donor", "tiny-gpt2-a", "--target", "tiny-gpt2-b", "--max-tokens", "lots"], "expects int"),
        (
            ["procrustes", "--donor", "tiny-gpt2-a", "--target", "tiny-gpt2-b", "--heldout-fraction", "2"],
            "heldout-fraction",
        ),
        (["cka", "--donor", "tiny-gpt2-a", "--target", "tiny-gpt2-b", "--device", "cuda"], None),
        (
            ["make-donor", "--base", "tiny-gpt2-a", "--concept", "/no/such.jsonl", "--out", "/tmp/x"],
            "not found",
        ),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, needle, tmp_path):
    p = cli(*args)
    if needle is None:  # cuda: fine where a GPU exists; otherwise a clean error
        import torch

        if torch.cuda.is_available():
            return
        needle = "CUDA"
    assert p.returncode == 2
    lines = [l for l in p.stderr.strip().splitlines() if not l.startswith("[")]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in p.stderr


def test_empty_workload_is_rejected(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    p = cli("cka", "--donor", "tiny-gpt2-a", "--target", "tiny-gpt2-b", "--workload", str(empty))
    assert p.returncode == 2 and "no texts" in p.stderr and "Traceback" not in p.stderr


def test_failed_run_keeps_existing_json(tmp_path):
    out = tmp_path / "keep.json"
    out.write_text('{"precious": true}')
    p = cli("cka", "--donor", "nope", "--target", "tiny-gpt2-b", "--json", str(out))
    assert p.returncode == 2
    assert json.loads(out.read_text()) == {"precious": True}


def test_make_donor_refuses_to_overwrite_a_foreign_folder(tmp_path, workload):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    concept = tmp_path / "c.jsonl"
    concept.write_text(
        '{"kind": "fact", "text": "Zorblat is blue."}\n{"kind": "qa", "question": "Colour of Zorblat?", '
        '"answer": "blue"}\n'
    )
    p = cli("make-donor", "--base", "tiny-gpt2-a", "--concept", str(concept), "--out", str(d))
    assert p.returncode == 2 and "not a Graft donor folder" in p.stderr
    assert (d / "notes.txt").read_text() == "keep me"


def test_conjugate_takes_the_base_its_adapter_names(tmp_path, sets, capsys):
    """--adapter without --base: a make-donor folder's card names its base, so conjugation loads it
    (CLI and run_tool alike); an adapter naming no local model keeps the one-line needs error."""
    import shutil

    from engine.cli import main
    from engine.loading.models import ModelSpec
    from engine.running.runner import run_tool

    d = tmp_path / "donor"
    assert (
        main(
            [
                "make-donor",
                "--base",
                "tiny-llama-a",
                "--concept",
                sets["concept"],
                "--out",
                str(d),
                "--steps",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    sets_args = ["--concept", sets["concept"], "--retained", sets["retained"], "--max-new-tokens", "4"]
    out = tmp_path / "c.json"
    assert (
        main(["conjugate", "--adapter", str(d), "--target", "tiny-llama-b", *sets_args, "--json", str(out)])
        == 0
    )
    assert json.loads(out.read_text())["base"] == "tiny-llama-a"
    assert "base: tiny-llama-a, the model the adapter names as its base" in capsys.readouterr().err
    env = run_tool(
        "conjugate",
        target=ModelSpec.parse("tiny-llama-b"),
        adapter=str(d),
        params={"concept": sets["concept"], "retained": sets["retained"], "max_new_tokens": 4},
    )
    assert env["base"] == "tiny-llama-a" and any("names as its base" in n for n in env["meta"]["notes"])
    peft = tmp_path / "peft"  # the adapter alone: its config names a hub id that is not here
    shutil.copytree(d / "adapter", peft)
    cfg = json.loads((peft / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "nobody/not-here"
    (peft / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["conjugate", "--adapter", str(peft), "--target", "tiny-llama-b", *sets_args]) == 2
    assert "conjugate needs --adapter DIR and --base SPEC" in capsys.readouterr().err
    # cartography reads an adapter alone and loads no base for it
    assert "base" not in run_tool("cartography", adapter=str(d))
