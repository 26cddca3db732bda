"""viz/: figures built from real tool results on tiny random models (no placeholder data)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import plotly.graph_objects as go
import pytest

import viz
from engine.loading.models import ModelSpec
from engine.running.runner import run_tool
from viz.alignment import bridge_figure, cka_figure, procrustes_figure
from viz.compat import compat_figure

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("compat", "cka", "procrustes", "bridge-check")
PAIRS = {
    "same-family": ("tiny-gpt2-a", "tiny-gpt2-b"),
    "cross-family": ("tiny-gpt2-a", "tiny-llama-b"),
    "self": ("tiny-gpt2-a", "tiny-gpt2-a"),
}
SENTENCES = [
    "The cat sat quietly on the warm mat.",
    "Paris is the capital of France.",
    "Water boils at one hundred degrees Celsius.",
    "The river flows north through the green valley.",
    "She reads a short book every night before sleep.",
    "Dogs like to run and play in the park.",
    "The sun rises in the east and sets in the west.",
    "Music can make people feel happy and calm.",
    "Light travels much faster than sound.",
    "Mountains and forests shape where people live.",
]


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("viz") / "sentences.txt"
    p.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return str(p)


@pytest.fixture(scope="module")
def envelopes(workload) -> dict:
    out = {}
    for pair, (d, t) in PAIRS.items():
        for tool in TOOLS:
            env = run_tool(tool, ModelSpec.parse(d), ModelSpec.parse(t), {"workload": workload})
            # Figures receive what the UI/CLI receive: a JSON round-tripped envelope.
            out[pair, tool] = json.loads(json.dumps(env))
    return out


@pytest.fixture(scope="module")
def narrow_folder(tmp_path_factory) -> str:
    """A local HF folder with a narrower, shallower GPT-2 (width 32, 3 layers): widths differ from
    the tiny models, so raw epsilon and the identity baseline are undefined."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from engine.loading.tiny import build_tiny

    _, tok = build_tiny("tiny-gpt2-a")
    cfg = GPT2Config(
        n_layer=3,
        n_embd=32,
        n_head=4,
        n_positions=256,
        vocab_size=len(tok),
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    folder = tmp_path_factory.mktemp("narrow") / "gpt2-narrow"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def narrow_envelopes(workload, narrow_folder) -> dict:
    return {
        tool: json.loads(
            json.dumps(
                run_tool(
                    tool,
                    ModelSpec.parse("tiny-gpt2-a"),
                    ModelSpec.parse(narrow_folder),
                    {"workload": workload},
                )
            )
        )
        for tool in TOOLS
    }


def _heatmaps(fig: go.Figure) -> list:
    return [t for t in fig.data if t.type == "heatmap"]


def _z(trace) -> list[list[float]]:
    return [list(row) for row in trace.z]


def _check_common(fig: go.Figure, env: dict) -> None:
    assert isinstance(fig, go.Figure)
    json.loads(fig.to_json())  # serialisable
    title = fig.layout.title.text
    assert env["donor"] in title and env["target"] in title and env["meta"]["code"] in title
    name = viz.download_config(fig)["toImageButtonOptions"]["filename"]
    assert name.startswith(f"graft_{env['meta']['code']}_") and "/" not in name


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("tool", TOOLS)
def test_figure_for_every_tool_and_pair(envelopes, pair, tool):
    env = envelopes[pair, tool]
    fig = viz.figure_for(tool, env)
    _check_common(fig, env)


@pytest.mark.parametrize("pair", list(PAIRS))
def test_cka_heatmap_and_matching_come_from_result(envelopes, pair):
    env = envelopes[pair, "cka"]
    r = env["result"]
    fig = viz.figure_for("cka", env)
    (heat,) = _heatmaps(fig)
    assert _z(heat) == r["matrix"]
    assert list(heat.x) == r["target_layers"] and list(heat.y) == r["donor_layers"]
    assert heat.zmin == 0 and heat.zmax == 1
    assert (
        "CKA" in heat.hovertemplate
        and "donor layer" in heat.hovertemplate
        and "target layer" in heat.hovertemplate
    )
    (path,) = [t for t in fig.data if t.type == "scatter"]
    assert [[y, x] for x, y in zip(path.x, path.y)] == r["matching"]
    assert "lines" in path.mode and "markers" in path.mode
    sub = fig.layout.title.subtitle.text
    assert f"{r['mean_matched_cka']:.3f}" in sub and r["alignment"] in sub and f"{r['n_rows']:,}" in sub


def test_cka_self_diagonal(envelopes):
    r = envelopes["self", "cka"]["result"]
    fig = cka_figure(envelopes["self", "cka"])
    (path,) = [t for t in fig.data if t.type == "scatter"]
    assert list(path.x) == list(path.y) == r["donor_layers"]  # a model against itself matches i -> i


@pytest.mark.parametrize("pair", list(PAIRS))
def test_procrustes_series_come_from_result(envelopes, pair):
    env = envelopes[pair, "procrustes"]
    layers = env["result"]["layers"]
    fig = viz.figure_for("procrustes", env)
    by_name = {t.name: t for t in fig.data}
    labels = [f"donor {l['donor_layer']} → target {l['target_layer']}" for l in layers]
    held = by_name["Procrustes, held-out rows"]
    assert list(held.x) == labels
    assert list(held.y) == [l["residual_heldout"] for l in layers]
    assert list(by_name["Procrustes, fit rows"].y) == [l["residual_fit"] for l in layers]
    assert list(by_name["ridge (unconstrained linear), held-out"].y) == [l["residual_ridge"] for l in layers]
    assert list(by_name["identity map, held-out"].y) == [l["residual_identity"] for l in layers]
    assert list(held.customdata) == [f"{l['alignment']:.3f}" for l in layers]  # alignment in hover
    assert f"{env['result']['mean_alignment']:.3f}" in fig.layout.title.subtitle.text


@pytest.mark.parametrize("pair", list(PAIRS))
def test_bridge_two_heatmaps_when_raw_defined(envelopes, pair):
    env = envelopes[pair, "bridge-check"]
    r = env["result"]
    assert r["epsilon_raw"] is not None  # the tiny models all have width 64
    fig = viz.figure_for("bridge-check", env)
    raw, bridged = _heatmaps(fig)
    assert _z(raw) == r["epsilon_raw"] and _z(bridged) == r["epsilon_bridged"]
    assert list(raw.x) == r["target_positions"] and list(raw.y) == r["donor_positions"]
    assert fig.layout.coloraxis.reversescale is True and fig.layout.coloraxis.cmin == 0
    # hover carries both cosines
    assert raw.customdata[0][0][1] == f"{r['cos_raw'][0][0]:.3f}"
    assert raw.customdata[0][0][3] == f"{r['cos_bridged'][0][0]:.3f}"
    marks = [t for t in fig.data if t.type == "scatter" and t.name.startswith("direct replacement plausible")]
    if r["plausible_direct"]:
        (m,) = marks
        assert [[y, x] for x, y in zip(m.x, m.y)] == r["plausible_direct"]
        assert m.xaxis == "x"  # drawn on the raw panel
        assert f"{r['threshold']:.3f}" in m.name
    else:
        assert not marks


def test_bridge_self_pair_marks_diagonal(envelopes):
    r = envelopes["self", "bridge-check"]["result"]
    # donor == target: raw epsilon is 0 on the diagonal, so direct replacement is plausible there
    assert [[s, s] for s in r["donor_positions"]] == [p for p in r["plausible_direct"] if p[0] == p[1]]
    fig = bridge_figure(envelopes["self", "bridge-check"])
    (m,) = [t for t in fig.data if t.type == "scatter" and t.name.startswith("direct replacement plausible")]
    assert len(m.x) == len(r["plausible_direct"])


@pytest.mark.parametrize("pair", list(PAIRS))
def test_compat_tables(envelopes, pair):
    env = envelopes[pair, "compat"]
    r = env["result"]
    fig = viz.figure_for("compat", env)
    arch, verdicts = [t for t in fig.data if t.type == "table"]
    cols = arch.cells.values
    n = len(r["fields"])
    assert [str(x) for x in cols[1][:n]] == [viz.common.fmt_value(f["donor"]) for f in r["fields"]]
    assert [str(x) for x in cols[2][:n]] == [viz.common.fmt_value(f["target"]) for f in r["fields"]]
    assert [x == "✓" for x in cols[3][:n]] == [f["equal"] for f in r["fields"]]
    ops, marks, reasons = verdicts.cells.values
    assert len(ops) == len(r["verdicts"])
    assert [m.startswith("✓") for m in marks] == list(r["verdicts"].values())
    for op_reasons, text in zip(r["reasons"].values(), reasons):
        assert all(x in text for x in op_reasons)


# --- widths differ: raw epsilon / identity baseline are None -----------------------------------
def test_narrow_target_bridge_single_heatmap(narrow_envelopes):
    env = narrow_envelopes["bridge-check"]
    r = env["result"]
    assert r["epsilon_raw"] is None and r["plausible_direct"] == []
    fig = bridge_figure(env)
    (heat,) = _heatmaps(fig)
    assert _z(heat) == r["epsilon_bridged"]
    assert len(r["donor_positions"]) != len(r["target_positions"])  # non-square
    json.loads(fig.to_json())


def test_narrow_target_other_tools(narrow_envelopes):
    r = narrow_envelopes["procrustes"]["result"]
    assert all(l["residual_identity"] is None for l in r["layers"])
    fig = procrustes_figure(narrow_envelopes["procrustes"])
    assert "identity map, held-out" not in {t.name for t in fig.data}
    fig = cka_figure(narrow_envelopes["cka"])
    (heat,) = _heatmaps(fig)
    assert _z(heat) == narrow_envelopes["cka"]["result"]["matrix"]
    assert len(heat.z) == 4 and len(heat.z[0]) == 3
    for tool in TOOLS:
        fig = viz.figure_for(tool, narrow_envelopes[tool])
        json.loads(fig.to_json())
        # a local folder is titled by its name, not its full path
        assert "target gpt2-narrow" in fig.layout.title.text and "/" not in fig.layout.title.text


# --- edge cases ------------------------------------------------------------------------------
def test_one_by_one_and_missing_fields(envelopes):
    env = copy.deepcopy(envelopes["same-family", "cka"])
    r = env["result"]
    r.update(
        matrix=[r["matrix"][0][:1]],
        donor_layers=[0],
        target_layers=[0],
        matching=[[0, 0]],
        matching_cka=[r["matrix"][0][0]],
        mean_matched_cka=None,
    )
    fig = cka_figure(env)
    assert _z(_heatmaps(fig)[0]) == r["matrix"]
    fig.to_json()

    env = copy.deepcopy(envelopes["same-family", "bridge-check"])
    r = env["result"]
    keep = lambda M: [M[0][:1]]  # noqa: E731
    r.update(
        epsilon_raw=keep(r["epsilon_raw"]),
        cos_raw=keep(r["cos_raw"]),
        epsilon_bridged=keep(r["epsilon_bridged"]),
        cos_bridged=keep(r["cos_bridged"]),
        donor_positions=[0],
        target_positions=[0],
        plausible_direct=[],
        best_target_for_donor=[],
    )
    assert len(_heatmaps(bridge_figure(env))) == 2
    r.update(epsilon_raw=None, cos_raw=None)
    assert len(_heatmaps(bridge_figure(env))) == 1

    env = copy.deepcopy(envelopes["same-family", "procrustes"])
    env["result"]["layers"] = env["result"]["layers"][:1]
    env["result"]["layers"][0]["residual_identity"] = None
    procrustes_figure(env).to_json()
    env["result"]["layers"] = []
    procrustes_figure(env).to_json()

    # bare envelope pieces: no meta, no names
    for fn, tool in (
        (compat_figure, "compat"),
        (cka_figure, "cka"),
        (procrustes_figure, "procrustes"),
        (bridge_figure, "bridge-check"),
    ):
        fn({"result": envelopes["cross-family", tool]["result"]}).to_json()


def test_download_config_and_html(envelopes):
    fig = viz.figure_for("cka", envelopes["cross-family", "cka"])
    cfg = viz.download_config(fig)
    opts = cfg["toImageButtonOptions"]
    assert opts["format"] == "png" and opts["scale"] == 2
    assert opts["filename"] == "graft_T2_cka_tiny-gpt2-a_vs_tiny-llama-b"
    assert viz.DOWNLOAD_CONFIG["toImageButtonOptions"]["filename"] == "graft-figure"  # not mutated
    html = viz.figure_html(fig)
    assert html.lstrip().lower().startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert "graft_T2_cka_tiny-gpt2-a_vs_tiny-llama-b" in html
    assert (
        not re.search(r"<script[^>]*\bsrc=", html) and len(html) > 1_000_000
    )  # plotly.js inline: works offline


def test_viz_does_not_import_engine_compute():
    code = (
        "import sys, viz, viz.common, viz.compat, viz.alignment\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.') or "
        "m.startswith('engine')"
        " or m == 'streamlit')\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
