"""T12 on a streamed pair (engine/running/stream_rebuild.py, engine/tools/interference.py): T and T'
read block by block, T' a swap staged beside the target or a streamed run's saved folder. The same
numbers as the in-memory route, a model against itself changes nothing, and a T' or a target that
changed after the run is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import engine.api  # noqa: F401  (registers the tools)
from engine.core.errors import GraftError
from engine.loading.models import ModelSpec
from engine.loading.tiny import build_tiny
from engine.running.history import History, new_run_id
from engine.running.runner import pair_labels, run_tool
from engine.surgery.folder_edit import tensor_span

SWAP = "blocks.1.attn.q,blocks.3.mlp.down"
T12 = {"modules": SWAP, "max_new_tokens": 4, "prompt_tokens": 6}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama pair as folders, each in its own parent (a staged T' lands beside the target);
    the target in several shards, so a swap copies only some."""
    out = {}
    for name, shard in (("tiny-llama-a", None), ("tiny-llama-b", "300KB")):
        d = tmp_path_factory.mktemp(name) / "model"
        model, tok = build_tiny(name)
        model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
        tok.save_pretrained(d)
        out[name] = d
    return out


def _record(env: dict) -> str:
    """``env`` recorded as a finished run in this test's history, as the CLI records one."""
    history = History()
    run_id = new_run_id("test-")
    history.create(run_id, env["tool"], env["tool"], *pair_labels(env), {}, source="cli")
    history.start(run_id)
    env["run_id"] = run_id
    history.finish(run_id, "done", result=json.loads(json.dumps(env)))
    return run_id


def _same(a: dict, b: dict) -> None:
    for k in ("ppl_before", "ppl_after", "mean_loss_change", "max_loss_increase"):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    for k in ("locality", "n_prompts", "n_changed", "n_examples", "n_tokens"):
        assert a[k] == b[k], k
    assert [w["index"] for w in a["worst"]] == [w["index"] for w in b["worst"]]
    for x, y in zip(a["per_example"], b["per_example"]):
        assert x["loss_after"] == pytest.approx(y["loss_after"], rel=1e-5, abs=1e-7)
        assert x["changed"] == y["changed"]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def test_streamed_t12_equals_the_whole_route_and_leaves_nothing(folders, sets, one_thread):
    d, t = (ModelSpec.parse(str(folders[n])) for n in ("tiny-llama-a", "tiny-llama-b"))
    params = {**T12, "retained": sets["retained"]}
    runs = {s: run_tool("interference", d, t, {"stream": s}, params=params) for s in ("off", "on")}
    off, on = runs["off"]["result"], runs["on"]["result"]
    assert runs["on"]["meta"]["memory_plan"]["route"] == "stream"
    assert on["source"]["route"] == "streamed" and on["source"]["modules"] == off["source"]["modules"]
    _same(off["retained"], on["retained"])
    assert on["ppl_change_fraction"] != 0.0  # two different random models: the swap does change T
    for route in (off, on):
        assert route["stability_passed"] is True, route["stability"]
    assert on["stability"]["reapply"]["hash_first"] == on["source"]["changed_tensors_sha256"]
    assert on["stability"]["reload"]["weight_hash_matches_card"] is True
    assert _leftovers(folders["tiny-llama-b"]) == []  # the staged T' is gone


def test_streamed_t12_of_a_model_against_itself_changes_nothing(folders, sets, tmp_path, one_thread):
    twin = tmp_path / "twin"
    shutil.copytree(folders["tiny-llama-b"], twin)
    d, t = ModelSpec.parse(str(twin)), ModelSpec.parse(str(folders["tiny-llama-b"]))
    res = run_tool("interference", d, t, {"stream": "on"}, params={**T12, "retained": sets["retained"]})[
        "result"
    ]
    assert res["ppl_change_fraction"] == 0.0 and res["mean_loss_change"] == 0.0
    assert res["locality"] == 1.0 and res["retained"]["n_changed"] == 0
    assert res["stability_passed"] is True


def test_streamed_t12_of_a_run_checks_it_is_the_run_s(folders, sets, tmp_path, one_thread):
    d, t = (ModelSpec.parse(str(folders[n])) for n in ("tiny-llama-a", "tiny-llama-b"))
    save = tmp_path / "t-prime"
    swap = run_tool("swap", d, t, {"stream": "on"}, params={"modules": SWAP, "save": str(save), **sets})
    run_id = _record(swap)
    params = {"max_new_tokens": 4, "prompt_tokens": 6, "retained": sets["retained"]}
    res = run_tool("interference", options={"stream": "on"}, params=params, run=run_id)["result"]
    assert res["source"]["kind"] == "run" and res["source"]["route"] == "streamed"
    assert res["source"]["changed_tensors_sha256"] == swap["result"]["saved_files"]["changed_tensors_sha256"]
    assert res["stability"]["reapply"]["passed"] and res["stability"]["reapply"]["hash_recorded"]
    assert res["stability_passed"] is True
    spot = run_tool("interference", d, t, {"stream": "on"}, params={**T12, "retained": sets["retained"]})
    _same(spot["result"]["retained"], res["retained"])  # the run's T' is the swap made on the spot

    # T' changed after the run: one byte of a changed tensor flipped
    card = json.loads((save / "surgery.json").read_text())
    key = card["changed_tensors"][0]
    shard = next(p for p in save.glob("*.safetensors") if _has(p, key))
    offset, _ = tensor_span(shard, key)
    with open(shard, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(GraftError, match="is not the one run"):
        run_tool("interference", options={"stream": "on"}, params=params, run=run_id)


def _has(path: Path, key: str) -> bool:
    try:
        tensor_span(path, key)
        return True
    except GraftError:
        return False


def test_streamed_t12_refuses_a_run_whose_target_changed(folders, sets, tmp_path, one_thread):
    target = tmp_path / "target"
    shutil.copytree(folders["tiny-llama-b"], target)
    d, t = ModelSpec.parse(str(folders["tiny-llama-a"])), ModelSpec.parse(str(target))
    save = tmp_path / "t-prime"
    run_id = _record(
        run_tool("swap", d, t, {"stream": "on"}, params={"modules": SWAP, "save": str(save), **sets})
    )
    cfg = target / "config.json"
    shard = sorted(target.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data)  # the same bytes in a new file: the run's files are not these
    assert cfg.exists()
    with pytest.raises(GraftError, match="has changed since run"):
        run_tool("interference", options={"stream": "on"}, params={"retained": sets["retained"]}, run=run_id)
    shutil.rmtree(save)
    with pytest.raises(GraftError, match="gone"):
        run_tool("interference", options={"stream": "on"}, params={"retained": sets["retained"]}, run=run_id)


# -- T9 on a streamed target (engine/running/organ_stream.py) ----------------------------------------


def _organ(folder: Path, out: Path, start: int = 1, size: int = 2) -> str:
    from engine.loading.models import load_model
    from engine.surgery.organ import extract_organ, save_organ

    save_organ(extract_organ(load_model(ModelSpec.parse(str(folder)), "cpu"), start, size), out)
    return str(out)


def _sweep(target: Path, organ: str, stream: str, workload: str, sets: dict, **params) -> dict:
    return run_tool(
        "position-sweep",
        target=ModelSpec.parse(str(target)),
        organ=organ,
        options={"stream": stream, "workload": workload},
        params={"positions": "0,1,2", "strategy": "direct", **sets, **params},
    )


def test_streamed_t9_equals_the_whole_route(folders, sets, workload, tmp_path, one_thread):
    organ = _organ(folders["tiny-llama-a"], tmp_path / "organ")
    runs = {s: _sweep(folders["tiny-llama-b"], organ, s, workload, sets) for s in ("off", "on")}
    off, on = runs["off"]["result"], runs["on"]["result"]
    assert runs["on"]["meta"]["memory_plan"]["route"] == "stream"
    assert [p["position"] for p in on["points"]] == [0, 1, 2]
    for a, b in zip(off["points"], on["points"]):
        for k in ("ppl_concept", "ppl_retained", "task_score", "epsilon"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), (a["position"], k)
    for k in ("ppl_concept", "ppl_retained", "task_score"):
        assert on["baseline"][k] == pytest.approx(off["baseline"][k], rel=1e-5)
    assert on["best"] == off["best"] and on["spearman_concept"] == pytest.approx(off["spearman_concept"])
    written = runs["on"]["meta"]["streamed_insertions"]
    assert [w["tensors_written"] for w in written] == [2 * 9] * 3  # two Llama blocks of 9 tensors each
    assert any("stored dtype" in n for n in runs["on"]["meta"]["notes"])
    assert _leftovers(folders["tiny-llama-b"]) == []


def test_streamed_t9_of_the_target_s_own_blocks_changes_nothing(
    folders, sets, workload, tmp_path, one_thread
):
    """Blocks 1-2 of the target put back at position 1: T' is T, to the bit."""
    organ = _organ(folders["tiny-llama-b"], tmp_path / "own")
    res = _sweep(folders["tiny-llama-b"], organ, "on", workload, sets, positions="1", epsilon=False)["result"]
    (pt,) = res["points"]
    assert {k: pt[k] for k in res["baseline"]} == res["baseline"]


def test_streamed_t9_refuses_what_it_cannot_run(folders, sets, workload, tmp_path):
    organ = _organ(folders["tiny-llama-a"], tmp_path / "organ")
    with pytest.raises(GraftError, match="direct strategy only"):
        _sweep(folders["tiny-llama-b"], organ, "on", workload, sets, strategy="direct+recovery")
    gpt2 = tmp_path / "gpt2"
    model, tok = build_tiny("tiny-gpt2-a")
    model.save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    with pytest.raises(GraftError, match="does not fit|architecture|family"):
        _sweep(gpt2, organ, "on", workload, sets, epsilon=False)
    assert not [p.name for p in gpt2.parent.iterdir() if p.name.startswith(".")]  # nothing staged left


def test_a_streamed_pass_reports_blocks_and_bytes_and_cancels_between_blocks(folders, sets, one_thread):
    import re

    from engine.core.errors import Cancelled
    from engine.core.progress import Progress

    d, t = (ModelSpec.parse(str(folders[n])) for n in ("tiny-llama-a", "tiny-llama-b"))
    params = {**T12, "retained": sets["retained"], "stability": False}
    seen: list[tuple[float, str]] = []
    run_tool(
        "interference",
        d,
        t,
        {"stream": "on"},
        params=params,
        progress=Progress(lambda f, m: seen.append((f, m))),
    )
    notes = [(f, m) for f, m in seen if re.search(r"block \d+/4 read, \d+\.\d\d GB read in all", m)]
    assert notes and {m.split(": block")[0] for _, m in notes} >= {
        "model"
    }  # both skeletons are named "model"
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions)  # a note repeats the last fraction: the bar never goes back

    def cancel_mid_pass(f: float, m: str) -> None:
        if "block 2/4 read" in m:
            pr.cancel()

    pr = Progress(cancel_mid_pass)
    with pytest.raises(Cancelled):
        run_tool("interference", d, t, {"stream": "on"}, params=params, progress=pr)
    assert _leftovers(folders["tiny-llama-b"]) == []  # the staged T' is removed on a cancel too
