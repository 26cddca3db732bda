"""One conformance suite over every registered tool (scikit-learn's parametrize_with_checks idea)."""
import dataclasses
import json
import subprocess
import sys

import pytest

from engine.context import run_tool
from engine.errors import Cancelled, GraftError
from engine.models import ModelSpec
from engine.params import build_params, param_specs
from engine.progress import Progress
from engine.registry import all_tools, get_tool, register

TOOLS = [t.name for t in all_tools()]
PAIRS = [("tiny-gpt2-a", "tiny-gpt2-b"), ("tiny-gpt2-a", "tiny-llama-b")]


def test_registry_holds_the_alignment_tools():
    codes = {t.code for t in all_tools()}
    assert {"T1", "T2", "T3", "T4"} <= codes


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register(get_tool("cka"))


@pytest.mark.parametrize("name", TOOLS)
def test_params_are_typed_with_help_and_validated(name):
    tool = get_tool(name)
    assert dataclasses.is_dataclass(tool.params_cls)
    specs = param_specs(tool.params_cls)
    for s in specs:
        assert s.help and s.type in (int, float, bool, str)
        if s.choices:
            assert s.default in s.choices
    default = build_params(tool.params_cls)
    with pytest.raises(dataclasses.FrozenInstanceError):
        for s in specs:
            setattr(default, s.name, s.default)
        raise dataclasses.FrozenInstanceError("no params")  # tools without params are trivially frozen
    with pytest.raises(GraftError, match="unknown parameter"):
        build_params(tool.params_cls, {"no_such_param": 1})
    for s in specs:
        if s.min is not None and s.type in (int, float):
            with pytest.raises(GraftError, match=s.flag):
                build_params(tool.params_cls, {s.name: s.min - 1})


@pytest.mark.parametrize("name", TOOLS)
@pytest.mark.parametrize("pair", PAIRS, ids=["same-family", "cross-family"])
def test_compute_result_is_json_deterministic_and_reports_progress(name, pair, workload):
    seen = []
    if get_tool(name).same_family and pair[0].split("-")[1] != pair[1].split("-")[1]:
        with pytest.raises(GraftError, match="same family"):
            run_tool(name, ModelSpec.parse(pair[0]), ModelSpec.parse(pair[1]), {"workload": workload})
        return
    env = run_tool(name, ModelSpec.parse(pair[0]), ModelSpec.parse(pair[1]), {"workload": workload},
                   progress=Progress(lambda f, m: seen.append(f)))
    assert set(env) == {"tool", "donor", "target", "result", "meta"}
    assert env["tool"] == name
    text = json.dumps(env, allow_nan=False)  # strict JSON: no NaN/Infinity sneaks into a result
    assert json.loads(text) == env
    assert seen and seen[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in seen)
    again = run_tool(name, ModelSpec.parse(pair[0]), ModelSpec.parse(pair[1]), {"workload": workload})
    assert again["result"] == env["result"]


@pytest.mark.parametrize("name", TOOLS)
def test_compute_can_be_cancelled(name, workload):
    p = Progress(lambda f, m: None)
    p.cancel()
    with pytest.raises(Cancelled):
        run_tool(name, ModelSpec.parse("tiny-gpt2-a"), ModelSpec.parse("tiny-gpt2-b"), {"workload": workload}, progress=p)


@pytest.mark.parametrize("name", TOOLS)
def test_figure_builder_renders_the_result(name, workload):
    go = pytest.importorskip("plotly.graph_objects")
    from viz import figure_for

    target = "tiny-gpt2-b" if get_tool(name).same_family else "tiny-llama-b"
    env = run_tool(name, ModelSpec.parse("tiny-gpt2-a"), ModelSpec.parse(target), {"workload": workload})
    fig = figure_for(name, json.loads(json.dumps(env)))  # from JSON, as when reopened from history
    assert isinstance(fig, go.Figure)
    assert len(fig.data) > 0
    fig.to_json()


@pytest.mark.parametrize("name", TOOLS)
def test_cli_runs_the_same_code_path(name, workload, tmp_path):
    out = tmp_path / "out.json"
    target = "tiny-gpt2-b" if get_tool(name).same_family else "tiny-llama-b"
    proc = subprocess.run([sys.executable, "-m", "engine", name, "--donor", "tiny-gpt2-a", "--target", target,
                           "--workload", workload, "--json", str(out), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    env = json.loads(out.read_text())
    direct = run_tool(name, ModelSpec.parse("tiny-gpt2-a"), ModelSpec.parse(target), {"workload": workload})
    assert env["result"] == json.loads(json.dumps(direct["result"]))
    assert env["tool"] == name and env["donor"] == "tiny-gpt2-a" and env["target"] == target
