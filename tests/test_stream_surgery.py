"""Transplants on streamed pairs (engine/surgery/folder_edit.py, engine/running/stream_surgery.py,
engine/loading/stream_forward.py): T' written as a folder without holding either model, equal to the
in-memory route, and the target's files never written."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine.api  # noqa: F401  (registers the tools)
from engine.core.errors import Cancelled, GraftError
from engine.core.progress import Progress
from engine.evaluation.evaluate import perplexity
from engine.loading.models import ModelSpec, load_model
from engine.loading.stream import WeightIndex
from engine.loading.stream_forward import streamed_forward
from engine.loading.tiny import build_tiny
from engine.running.runner import run_tool
from engine.surgery.folder_edit import FolderEdit

TEXTS = ["The cat sat on the mat.", "Paris is the capital of France, and a big city.", "hello"]
SWAP = "blocks.1.attn.q,blocks.3.mlp.down"


def _files_digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny Llama pair as folders; the target in several shards, so a swap touches only some."""
    out = {}
    for name, shard in (("tiny-llama-a", None), ("tiny-llama-b", "300KB")):
        d = tmp_path_factory.mktemp(name)
        model, tok = build_tiny(name)
        model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
        tok.save_pretrained(d)
        out[name] = d
    assert len(list(out["tiny-llama-b"].glob("*.safetensors"))) >= 3
    return out


def _all_meta(m) -> bool:
    return all(p.device.type == "meta" for p in m.model.parameters())


@pytest.mark.parametrize("name", ["tiny-llama-a", "tiny-gpt2-a"])
def test_streamed_forward_equals_the_whole_model(tmp_path, name, one_thread):
    model, tok = build_tiny(name)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    spec = ModelSpec.parse(str(tmp_path))
    whole = load_model(spec, "cpu", "float32")
    streamed = load_model(spec, "cpu", "float32", stream=True)
    a = perplexity(whole.model, whole.tokenizer, TEXTS)
    enc = whole.tokenizer(["The cat"], return_tensors="pt")
    g0 = whole.model.generate(**enc, max_new_tokens=4, do_sample=False)
    with streamed_forward(streamed) as net:
        b = perplexity(net, streamed.tokenizer, TEXTS)
        g1 = net.generate(**enc, max_new_tokens=4, do_sample=False)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6)
    assert torch.equal(g0, g1)
    assert _all_meta(streamed)  # every weight, the head included, dropped again


def test_folder_edit_links_untouched_files_and_patches_a_copy(folders, tmp_path):
    base = folders["tiny-llama-b"]
    before = _files_digest(base)
    index = WeightIndex(base)
    key = "model.layers.2.mlp.down_proj.weight"
    value = torch.randn(index.entries[key].shape)
    edit = FolderEdit(base, tmp_path / "tp")
    edit.write(key, value)
    staged = edit.finish({"operation": "test"})
    out = edit.commit()
    assert not staged.exists() and out.is_dir()
    assert _files_digest(base) == before  # the target's files are never written
    touched = index.entries[key].file
    for p in base.iterdir():
        if p.is_file():
            same = os.stat(p).st_ino == os.stat(out / p.name).st_ino
            assert same == (p.name != touched), p.name  # the touched shard is a copy, the rest links
    # transformers loads it, with the new tensor and every other one as it was
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    orig = AutoModelForCausalLM.from_pretrained(str(base)).state_dict()
    for k, v in orig.items():
        expect = value if k == key else v
        assert torch.equal(loaded[k], expect), k
    card = json.loads((out / "surgery.json").read_text())
    assert card["files"]["tensors_written"] == 1 and card["files"]["shards_copied"] == 1
    assert card["files"]["bytes_written"] == value.numel() * 4


def test_folder_edit_refuses_bad_writes_and_leaves_nothing(folders, tmp_path):
    base = folders["tiny-llama-b"]
    with pytest.raises(GraftError, match="outside"):
        FolderEdit(base, base / "inside")
    edit = FolderEdit(base, tmp_path / "tp")
    key = "model.layers.0.self_attn.q_proj.weight"
    shape = edit.index.entries[key].shape
    with pytest.raises(GraftError, match="shape"):
        edit.write(key, torch.zeros(shape[0] + 1, shape[1]))
    with pytest.raises(GraftError, match="non-finite"):
        edit.write(key, torch.full(shape, float("nan")))
    with pytest.raises(GraftError, match="no tensor"):
        edit.write("model.layers.0.nope.weight", torch.zeros(2))
    edit.abort()
    assert not (tmp_path / "tp").exists() and not any(p.name.startswith(".tp") for p in tmp_path.iterdir())


def _pair(folders):
    return ModelSpec.parse(str(folders["tiny-llama-a"])), ModelSpec.parse(str(folders["tiny-llama-b"]))


def _close(a, b, path="result"):
    if isinstance(a, dict):
        for k in a:
            if k in b and b[k] is not None:  # the streamed route generates only for the exact score
                _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), path
    else:
        assert a == b, path


def test_streamed_swap_equals_the_whole_route_and_saves_the_same_weights(folders, tmp_path, sets, one_thread):
    d, t = _pair(folders)
    runs = {}
    for stream in ("off", "on"):
        params = {"modules": SWAP, "save": str(tmp_path / stream), "score": "graded", **sets}
        runs[stream] = run_tool("swap", d, t, {"stream": stream, "device": "cpu"}, params=params)["result"]
    off, on = runs["off"], runs["on"]
    assert on["route"] == "streamed" and off["route"] == "whole"
    for k in ("before", "after", "donor", "tir", "recovery", "alignment_before", "alignment_after"):
        _close(off[k], on[k], k)
    assert on["before"]["task_score_exact"] is None and on["generations"] == []  # generated for "exact" only
    assert on["rollback_bit_exact"] and on["target_untouched"]
    files = on["saved_files"]
    assert files["tensors_written"] == 2 and files["shards_copied"] <= 2 and files["bytes_linked"] > 0
    a = {}
    for p in sorted((tmp_path / "off").glob("*.safetensors")):
        a.update(load_file(p))
    b = {}
    for p in sorted((tmp_path / "on").glob("*.safetensors")):
        b.update(load_file(p))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((tmp_path / "on" / "surgery.json").read_text())
    assert card["route"] == "streamed" and card["results"]["tir"] == on["tir"]


def test_streamed_swap_needs_a_folder_and_a_cancel_leaves_the_destination(
    folders, tmp_path, sets, one_thread
):
    d, t = _pair(folders)
    with pytest.raises(GraftError, match="--save"):
        run_tool("swap", d, t, {"stream": "on"}, params={"modules": SWAP, **sets})
    dest = tmp_path / "tp"
    dest.mkdir()
    (dest / "surgery.json").write_text("{}")  # an earlier transplant, which a failed run must keep
    (dest / "keep.txt").write_text("mine")

    def cb(frac, msg):
        if "T' from its folder" in msg:
            pr.cancel()

    pr = Progress(cb)
    with pytest.raises(Cancelled):
        run_tool(
            "swap", d, t, {"stream": "on"}, params={"modules": SWAP, "save": str(dest), **sets}, progress=pr
        )
    assert (dest / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tp"]  # no staged folder left behind


@pytest.mark.parametrize("route", ["adapter", "donor"])
def test_streamed_conjugation_equals_the_whole_route(folders, tmp_path, sets, route, one_thread):
    from peft import LoraConfig, get_peft_model

    base, target = _pair(folders)
    kw = {"base": base}
    donor = None
    if route == "adapter":
        with torch.random.fork_rng(devices=[]):
            model, _ = build_tiny("tiny-llama-a")
            pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        pm.save_pretrained(str(tmp_path / "ad"))
        kw["adapter"] = str(tmp_path / "ad")
    else:
        donor = target  # the target's own fine-tune of the base: donor and target are one folder
    runs = {}
    for stream in ("off", "on"):
        params = {"save": str(tmp_path / stream), "max_retained_increase": -1, "score": "graded", **sets}
        runs[stream] = run_tool("conjugate", donor, target, {"stream": stream}, params=params, **kw)["result"]
    off, on = runs["off"], runs["on"]
    for k in ("before", "after", "donor", "tir", "recovery", "alignment_before", "alignment_after"):
        _close(off[k], on[k], k)
    _close(off["interference"]["ppl_after"], on["interference"]["ppl_after"])
    assert on["route"] == "streamed" and on["target_untouched"] and on["saved_files"]["tensors_written"] > 0
    a = load_file(tmp_path / "off" / "model.safetensors")
    b = {}
    for p in sorted((tmp_path / "on").glob("*.safetensors")):
        b.update(load_file(p))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_streamed_conjugation_rolled_back_saves_nothing(folders, tmp_path, sets, one_thread):
    base, target = _pair(folders)
    params = {"save": str(tmp_path / "tp"), "min_locality": 1.0, "max_retained_increase": 0.0, **sets}
    res = run_tool("conjugate", target, target, {"stream": "on"}, params=params, base=base)["result"]
    # T' = T + (T - base) on random tiny models changes retained continuations: locality < 1 rolls back
    assert (
        res["interference"]["locality"] < 1.0 and res["rolled_back"] and "locality" in res["roll_back_reason"]
    )
    assert res["saved_to"] is None and not (tmp_path / "tp").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("tool", ["cartography", "spectrum"])
def test_weight_tools_on_a_streamed_fine_tune_equal_the_whole_route(folders, tool, one_thread):
    base, donor = _pair(folders)
    runs = {}
    for stream in ("off", "on"):
        env = run_tool(tool, donor, None, {"stream": stream}, base=base)
        assert env["meta"]["memory_plan"]["route"] == ("whole" if stream == "off" else "stream")
        runs[stream] = env["result"]
    _close(runs["off"], runs["on"])


def test_rank_modules_streamed_equals_the_whole_route(folders, workload, one_thread):
    d, t = _pair(folders)
    runs = {}
    for stream in ("off", "on"):
        env = run_tool("rank-modules", d, t, {"stream": stream, "workload": workload})
        runs[stream] = env["result"]
    assert [m["name"] for m in runs["off"]["modules"]] == [m["name"] for m in runs["on"]["modules"]]
    _close(runs["off"], runs["on"])
    plain = run_tool("cka", d, t, {"stream": "on", "workload": workload})["meta"]["memory_plan"]
    ranked = run_tool("rank-modules", d, t, {"stream": "on", "workload": workload})["meta"]["memory_plan"]
    assert ranked["peak_bytes"] > plain["peak_bytes"]  # the plan counts every module's output rows


def test_organ_extracted_from_a_streamed_donor_equals_the_whole_one(folders, tmp_path, one_thread):
    from engine.surgery.organ import load_organ

    spec = ModelSpec.parse(str(folders["tiny-llama-b"]))
    paths = {}
    for stream in ("off", "on"):
        env = run_tool("organ-extract", spec, None, {"stream": stream},
                       params={"start": 1, "size": 2, "out": str(tmp_path / stream)})  # fmt: skip
        assert env["result"]["bit_exact_reload"]
        paths[stream] = env["result"]["path"]
    a, b = load_organ(paths["off"]), load_organ(paths["on"])
    assert a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors
    )
    assert b.card["source"]["weight_hash"] is None and b.card["source"]["weight_files"].startswith("files:")
