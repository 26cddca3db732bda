"""Rules of the house that hold across tools: one JSON reader for every file a user brings (size,
depth and finite numbers), paths read from cards stay inside their folder, a damaged run-history row
names its run, adapters that fit nothing are refused, one rule for every list parameter, loading
never trains, the registry is filled from above, and the Python version is stated once."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.core.errors import GraftError
from engine.core.jsonio import inside, nesting_depth, read_json_file

ROOT = Path(__file__).resolve().parent.parent


def _deep(n: int) -> str:
    return "[" * n + "]" * n


# --------------------------------------------------------------------------------------------
# One JSON reader


def test_the_reader_refuses_deep_large_and_infinite_json(tmp_path):
    f = tmp_path / "x.json"
    f.write_text(_deep(100_000))
    with pytest.raises(GraftError, match="nested 100000 levels deep"):
        read_json_file(f)
    f.write_text(json.dumps({"a": [1, 2, {"b": "[[[[" * 50}]}))  # brackets inside strings do not count
    assert read_json_file(f)["a"][2]["b"].startswith("[[[[")
    f.write_text('{"size": 1e999}')
    with pytest.raises(GraftError, match=r"x\.json\.size holds a number too large"):
        read_json_file(f)
    f.write_text('{"size": NaN}')
    with pytest.raises(GraftError, match="not valid JSON"):
        read_json_file(f)
    f.write_text('{"ok": 1}')
    with pytest.raises(GraftError, match="is 9 bytes: more than the 4 Graft reads"):
        read_json_file(f, max_bytes=4)
    assert nesting_depth('{"a": "}}}\\"{{{", "b": [[1]]}') == 3


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_a_deep_config_json_is_one_line_and_exit_2(tmp_path, tiny_gpt2_folder):
    import shutil

    folder = tmp_path / "deep"
    shutil.copytree(tiny_gpt2_folder, folder)
    (folder / "config.json").write_text('{"model_type": "gpt2", "x": ' + _deep(100_000) + "}")
    out = _cli("compat", "--donor", str(folder), "--target", "tiny-gpt2-a", "--quiet")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nested" in lines[0] and "config.json" in lines[0], out.stderr
    assert "Traceback" not in out.stderr and "RecursionError" not in out.stderr


def test_an_organ_card_with_a_huge_number_or_deep_nesting_is_refused(tmp_path, tiny_organ):
    import shutil

    from engine.surgery.organ import ORGAN_CARD, load_organ

    organ = tmp_path / "organ"
    shutil.copytree(tiny_organ["path"], organ)
    card = json.loads((organ / ORGAN_CARD).read_text())
    (organ / ORGAN_CARD).write_text(json.dumps(card).replace(f'"size": {card["size"]}', '"size": 1e999'))
    with pytest.raises(GraftError, match="too large for a float"):
        load_organ(organ)
    (organ / ORGAN_CARD).write_text(_deep(100_000))
    with pytest.raises(GraftError, match="nested"):
        load_organ(organ)


def test_a_deep_adapter_config_is_refused(tmp_path, tiny_adapter):
    import shutil

    from engine.adapters.lora import resolve_adapter

    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter["path"], folder)
    (folder / "adapter_config.json").write_text('{"r": ' + _deep(100_000) + "}")
    with pytest.raises(GraftError, match="nested"):
        resolve_adapter(str(folder))


# --------------------------------------------------------------------------------------------
# Paths read from cards stay inside their folder


def test_inside_accepts_relative_paths_in_the_folder_only(tmp_path):
    (tmp_path / "sub").mkdir()
    assert inside(tmp_path, "sub/x.safetensors", "f") == (tmp_path / "sub" / "x.safetensors").resolve()
    for bad in ("../outside/x.safetensors", "/etc/passwd", "sub/../../x", "", None, 3):
        with pytest.raises(GraftError, match="f in"):
            inside(tmp_path, bad, "f")
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(GraftError, match="points outside its folder"):
        inside(tmp_path, "link/x", "f")


def test_a_saved_bridged_transplant_cannot_load_organ_blocks_from_outside(tmp_path):
    from safetensors.torch import save_file

    from engine.loading.bridged import BRIDGES_FILE, attach_saved_bridges
    from engine.loading.tiny import build_tiny

    model, _ = build_tiny("tiny-llama-a")
    d = model.config.hidden_size
    folder, outside_dir = tmp_path / "t", tmp_path / "outside"
    folder.mkdir()
    outside_dir.mkdir()
    tensors = {
        "0.w_in": torch.eye(d),
        "0.b_in": torch.zeros(d),
        "0.w_out": torch.eye(d),
        "0.b_out": torch.zeros(d),
    }
    save_file(tensors, str(folder / BRIDGES_FILE))
    save_file({"1.x": torch.zeros(1)}, str(outside_dir / "x.safetensors"))
    card = {
        "bridges": {
            "placements": [{"first": 1, "last": 1}],
            "organ_blocks": {"file": "../outside/x.safetensors", "blocks": [{"index": 1}]},
        }
    }
    (folder / "surgery.json").write_text(json.dumps(card))
    with pytest.raises(
        GraftError, match=r"organ_blocks\.file in .* points outside its folder \(\.\./outside"
    ):
        attach_saved_bridges(model, folder)


def test_donor_card_folders_cannot_point_outside(tmp_path, tiny_adapter):
    import shutil

    from engine.adapters.lora import resolve_adapter
    from engine.loading.model_folders import donor_merged_dir

    donor = tmp_path / "donor"
    shutil.copytree(tiny_adapter["path"], donor / "adapter")
    (donor / "card.json").write_text(json.dumps({"format": "graft-donor/1", "adapter_dir": "../elsewhere"}))
    with pytest.raises(GraftError, match=r"card\.json adapter_dir in .* points outside its folder"):
        resolve_adapter(str(donor))
    (donor / "card.json").write_text(json.dumps({"format": "graft-donor/1", "merged_dir": "/tmp"}))
    with pytest.raises(GraftError, match=r"card\.json merged_dir in .* points outside its folder"):
        donor_merged_dir(donor)
    (donor / "card.json").write_text(json.dumps({"format": "graft-donor/1", "adapter_dir": "adapter"}))
    assert resolve_adapter(str(donor)).path.resolve() == (donor / "adapter").resolve()


# --------------------------------------------------------------------------------------------
# A damaged run-history row


def test_a_damaged_history_row_names_its_run_and_the_others_still_read(home, tiny_run):
    from engine.running.history import History

    hist = History()
    good = tiny_run["run_id"]
    hist.create("damaged-1", "swap", "T11 Module swap", "a", "b", {"params": {}}, source="cli")
    hist.start("damaged-1")
    hist.finish("damaged-1", "done", result={"x": 1})
    with sqlite3.connect(str(hist.path)) as c:
        c.execute("UPDATE runs SET result=? WHERE id=?", ("{not json", "damaged-1"))
    with pytest.raises(GraftError, match="run damaged-1 is damaged in the run history"):
        hist.get("damaged-1")
    assert hist.get(good)["result"]["tool"] == "swap"
    assert {r["id"] for r in hist.list()} >= {good, "damaged-1"}
    for cmd in (
        ["report", "--run", "damaged-1", "--out", str(home / "r.html")],
        ["interference", "--run", "damaged-1", "--quiet"],
    ):
        out = _cli(*cmd)
        assert out.returncode == 2 and "damaged-1 is damaged" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# Checks that cannot pass vacuously


def test_an_adapter_for_another_architecture_is_refused(tiny_adapter):
    """A GPT-2 style adapter (PEFT's default target: the fused c_attn, canonical attn.qkv) on a Llama
    matches no module: refused, where it used to pass with a warning and base_checked: true."""
    from engine.adapters.lora import resolve_adapter
    from engine.adapters.lora_factors import adapter_deltas, check_against_model
    from engine.adapters.lowrank import ModuleDelta
    from engine.loading.models import ModelSpec, load_model

    llama = load_model(ModelSpec.parse("tiny-llama-a"), "cpu")
    assert check_against_model(adapter_deltas(resolve_adapter(tiny_adapter["path"])), llama) == []
    d = llama.model.config.hidden_size
    gpt2_style = [
        ModuleDelta(
            f"blocks.{i}.attn.qkv", i, "attn.qkv", "attention", torch.ones(3 * d, 2), torch.ones(2, d)
        )
        for i in range(2)
    ]
    with pytest.raises(
        GraftError, match=r"none of the adapter's 2 module\(s\) exists in the base model tiny-llama-a"
    ):
        check_against_model(gpt2_style, llama)
    # One module that does exist: checked, and the others named in a warning (not refused).
    mixed = gpt2_style + [
        ModuleDelta("blocks.0.attn.o", 0, "attn.o", "attention", torch.ones(d, 2), torch.ones(2, d))
    ]
    assert check_against_model(mixed, llama) == [
        "2 adapter module(s) do not exist in tiny-llama-a (blocks.0.attn.qkv, blocks.1.attn.qkv)"
    ]


@pytest.mark.parametrize(
    "call",
    [
        lambda: __import__("engine.running.module_choice", fromlist=["x"]).parse_modules(" , ,"),
        lambda: __import__("engine.adapters.delta_map", fromlist=["x"]).module_filter(" , ,"),
        lambda: __import__("engine.tools.sweep", fromlist=["x"]).parse_k_grid(" ,, ", 8),
        lambda: __import__("engine.running.organ_run", fromlist=["x"]).parse_positions(" , ", 4, 1),
        lambda: __import__("engine.tools.bridge_deviation", fromlist=["x"])._subsets(","),
    ],
)
def test_a_list_of_only_separators_names_nothing_and_is_refused(call):
    with pytest.raises(GraftError, match="names nothing"):
        call()


def test_an_empty_list_means_the_default_everywhere():
    from engine.adapters.delta_map import module_filter
    from engine.running.module_choice import parse_modules
    from engine.running.organ_run import parse_positions
    from engine.tools.bridge_deviation import _subsets
    from engine.tools.sweep import default_k_grid, parse_k_grid

    assert parse_modules("  ") == [] and module_filter("") is None
    assert parse_k_grid("", 8) == (default_k_grid(8), [])
    assert parse_positions(" ", 4, 2) == [0, 1, 2] and parse_positions("2, 0", 4, 2) == [0, 2]
    assert _subsets("") == [0.5, 1.0] and _subsets("1, 0.25") == [0.25, 1.0]
    assert parse_modules("blocks.1.attn.q, blocks.1.attn.q ,blocks.0.mlp.up") == [
        "blocks.1.attn.q",
        "blocks.0.mlp.up",
    ]


# --------------------------------------------------------------------------------------------
# Loading never trains; the registry is filled from above


def test_loading_the_demo_donor_never_builds_it(tmp_path, monkeypatch):
    import engine.adapters.donor as donor_module
    from engine.loading.builtins import DEMO_DONOR
    from engine.loading.models import ModelSpec, load_model

    monkeypatch.setenv("GRAFT_MODELS_HOME", str(tmp_path))
    monkeypatch.setattr(donor_module, "make_donor", lambda *a, **k: pytest.fail("loading trained a donor"))
    with pytest.raises(
        GraftError, match="demo donor .* is not built yet: build it with python -m engine prepare"
    ):
        load_model(ModelSpec.parse(DEMO_DONOR), "cpu")
    assert not any(tmp_path.iterdir())  # nothing was written either


def test_the_registry_is_empty_until_the_tools_are_imported():
    code = (
        "import engine.running.registry as r\n"
        "from engine.core.errors import GraftError\n"
        "assert r.all_tools() == []\n"
        "try:\n    r.get_tool('cka')\nexcept GraftError as e:\n    print(e)\n"
        "import engine.tools\n"
        "print(r.get_tool('cka').code)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()
    assert "no tool is registered" in first and "import engine.tools" in first and second == "T2"


# --------------------------------------------------------------------------------------------
# One Python version, stated once and true here


def test_the_python_version_is_stated_once_and_holds():
    req = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert req, "pyproject.toml states requires-python"
    need = (int(req.group(1)), int(req.group(2)))
    readme = (ROOT / "README.md").read_text()
    stated = set(re.findall(r"Python (\d+\.\d+)", readme))
    assert stated == {f"{need[0]}.{need[1]}"}, stated
    assert sys.version_info[:2] >= need


def test_a_tool_given_a_run_is_labelled_with_that_runs_pair(home, tiny_run):
    from engine.running.runner import input_labels

    assert input_labels({"run": tiny_run["run_id"]}) == ("tiny-gpt2-b", "tiny-gpt2-a")
    assert input_labels({"run": "no-such-run"}) == ("", "")
    assert input_labels({"donor": "a", "target": "b", "run": tiny_run["run_id"]}) == ("a", "b")


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_every_bench_script_imports_and_explains_itself(script):
    """The benches are not run by the suite, so at least their imports and --help are: a moved module
    or a registry left empty fails here, not months later in a bench run."""
    out = subprocess.run(
        [sys.executable, f"bench/{script}", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(out.stdout) > 100
