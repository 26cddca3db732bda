"""One conformance suite over every registered tool (scikit-learn's parametrize_with_checks idea)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.errors import Cancelled, GraftError
from engine.core.params import build_params, param_specs
from engine.core.progress import Progress
from engine.loading.models import ModelSpec
from engine.running.registry import MODEL_INPUTS, Tool, all_tools, get_tool, register
from engine.running.runner import run_tool

ROOT = Path(__file__).resolve().parent.parent
TOOLS = [t.name for t in all_tools()]
PAIRS = [("tiny-gpt2-a", "tiny-gpt2-b"), ("tiny-gpt2-a", "tiny-llama-b")]


def test_registry_holds_the_alignment_tools():
    codes = {t.code for t in all_tools()}
    assert {"T1", "T2", "T3", "T4"} <= codes


def test_every_module_in_engine_tools_registers_a_tool():
    """Tool modules are discovered, so a new file is enough; a file that registers nothing is a
    mistake (a helper belongs next to the code that uses it, not in engine/tools/)."""
    import importlib

    from engine.tools import TOOL_MODULES

    names = {p.stem for p in (ROOT / "engine" / "tools").glob("*.py") if not p.stem.startswith("_")}
    assert set(TOOL_MODULES) == names
    registered = all_tools()
    for name in TOOL_MODULES:
        mod = importlib.import_module(f"engine.tools.{name}")
        own = [v for v in vars(mod).values() if isinstance(v, Tool) and any(v is t for t in registered)]
        assert own, f"engine/tools/{name}.py registers no tool"


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register(get_tool("cka"))
    with pytest.raises(ValueError, match="code T2 is already cka's"):
        register(dataclasses.replace(get_tool("cka"), name="cka-again"))
    with pytest.raises(TypeError, match="code must be"):
        register(dataclasses.replace(get_tool("cka"), name="cka-again", code="T2b"))


def test_every_tool_has_its_own_code():
    codes = [t.code for t in all_tools()]
    assert len(codes) == len(set(codes)), sorted(codes)
    assert get_tool("swap").code == "T11" and get_tool("conjugate").code == "OP3"


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
    assert tool.params_cls.__dataclass_params__.frozen
    for s in specs:  # every field refuses an assignment (one raise per field, so none can hide another)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(default, s.name, s.default)
    with pytest.raises(GraftError, match="unknown parameter"):
        build_params(tool.params_cls, {"no_such_param": 1})
    for s in specs:
        if s.min is not None and s.type in (int, float):
            with pytest.raises(GraftError, match=s.flag):
                build_params(tool.params_cls, {s.name: s.min - 1})
        if s.type is int and s.name == "seed":  # torch generators take 64-bit seeds: a bound, not an overflow
            assert s.max is not None and s.max <= 2**63 - 1
            with pytest.raises(GraftError, match=s.flag):
                build_params(tool.params_cls, {s.name: 10**20})


CASES = [(t.name, alt) for t in all_tools() for alt in t.needs]


def case_id(case) -> str:
    return f"{case[0]}[{'+'.join(case[1])}]"


@pytest.fixture
def tool_inputs(request, workload):
    """Build the inputs a tool declares (Tool.needs) for one alternative: tiny models, the tiny
    PEFT adapter for 'adapter' (with its base for 'base'), a tiny organ checkpoint for 'organ'
    (fixture ``tiny_organ``), a finished tiny transplant run for 'run' (fixture ``tiny_run``), the
    shared tiny workload."""

    def make(alt: tuple[str, ...], pair=PAIRS[0]) -> dict:
        kw: dict = {}
        if "organ" in alt:
            kw["organ"] = request.getfixturevalue("tiny_organ")["path"]
        if "run" in alt:
            kw["run"] = request.getfixturevalue("tiny_run")["run_id"]
        if "adapter" in alt:
            kw["adapter"] = request.getfixturevalue("tiny_adapter")["path"]
        if "base" in alt:
            kw["base"] = ModelSpec.parse("tiny-llama-a")
            if "donor" in alt and "target" not in alt:  # a full fine-tune: same architecture as the base
                kw["donor"] = ModelSpec.parse("tiny-llama-b")
        if "donor" in alt and "donor" not in kw:
            kw["donor"] = ModelSpec.parse(pair[0] if "base" not in alt else "tiny-llama-b")
        if "target" in alt:
            kw["target"] = ModelSpec.parse(pair[1] if "base" not in alt else "tiny-llama-b")
        return kw

    return make


def test_needs_are_declared_and_enforced():
    for t in all_tools():
        assert t.needs and all(set(alt) <= set(MODEL_INPUTS) for alt in t.needs)
        with pytest.raises(GraftError, match="needs"):
            run_tool(t.name)  # nothing given: one line naming what is needed
    with pytest.raises(GraftError, match="does not use --adapter"):
        run_tool("cka", ModelSpec.parse("tiny-gpt2-a"), ModelSpec.parse("tiny-gpt2-b"), adapter="x")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("pair", PAIRS, ids=["same-family", "cross-family"])
def test_compute_result_is_json_deterministic_and_reports_progress(case, pair, workload, tool_inputs):
    name, alt = case
    seen = []
    kw = tool_inputs(alt, pair)
    # A same-family tool refuses a cross-family donor/target pair; an alternative without that pair
    # (a run id: the run's own models) has nothing to refuse. An organ (tiny_organ, from tiny-gpt2-a,
    # the pairs' first model) stands for the donor.
    paired = {"donor", "target"} <= set(alt) or {"organ", "target"} <= set(alt)
    if get_tool(name).same_family and paired and pair[0].split("-")[1] != pair[1].split("-")[1]:
        with pytest.raises(GraftError, match="same family"):
            run_tool(name, options={"workload": workload}, **kw)
        return
    env = run_tool(name, options={"workload": workload}, progress=Progress(lambda f, m: seen.append(f)), **kw)
    assert (
        {"tool", "donor", "target", "result", "meta"} <= set(env) <= {"tool", "result", "meta", *MODEL_INPUTS}
    )
    assert env["tool"] == name
    text = json.dumps(env, allow_nan=False)  # strict JSON: no NaN/Infinity sneaks into a result
    assert json.loads(text) == env
    assert seen and seen[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in seen)
    again = run_tool(name, options={"workload": workload}, **kw)
    assert again["result"] == env["result"]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_compute_can_be_cancelled(case, workload, tool_inputs):
    name, alt = case
    p = Progress(lambda f, m: None)
    p.cancel()
    with pytest.raises(Cancelled):
        run_tool(name, options={"workload": workload}, progress=p, **tool_inputs(alt))


def _figure_pair(name: str) -> tuple[str, str]:
    return ("tiny-gpt2-a", "tiny-gpt2-b") if get_tool(name).same_family else ("tiny-gpt2-a", "tiny-llama-b")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_figure_builder_renders_the_result(case, workload, tool_inputs):
    go = pytest.importorskip("plotly.graph_objects")
    from viz import figure_for

    name, alt = case
    env = run_tool(name, options={"workload": workload}, **tool_inputs(alt, _figure_pair(name)))
    fig = figure_for(name, json.loads(json.dumps(env)))  # from JSON, as when reopened from history
    assert isinstance(fig, go.Figure)
    assert len(fig.data) > 0
    fig.to_json()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cli_runs_the_same_code_path(case, workload, tmp_path, tool_inputs):
    name, alt = case
    out = tmp_path / "out.json"
    kw = tool_inputs(alt, _figure_pair(name))
    flags = [x for k, v in kw.items() for x in (f"--{k}", v.ref if isinstance(v, ModelSpec) else str(v))]
    wl = ["--workload", workload] if get_tool(name).uses_workload else []
    proc = subprocess.run(
        [sys.executable, "-m", "engine", name, *flags, *wl, "--json", str(out), "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    env = json.loads(out.read_text())
    direct = run_tool(name, options={"workload": workload}, **kw)
    assert env["result"] == json.loads(json.dumps(direct["result"]))
    assert env["tool"] == name and env["run_id"]
    for k, v in kw.items():
        assert env[k] == (v.ref if isinstance(v, ModelSpec) else v)
