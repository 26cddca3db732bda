"""Streamed models (engine/loading/stream.py, engine/measure/stream_capture.py) against the same
models held whole: the same rows, the same T1-T4 results, nothing left behind by a cancel, and the
memory plan's refusals in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engine.core.errors import Cancelled, GraftError
from engine.core.progress import Progress
from engine.loading.models import ModelSpec, load_model
from engine.loading.tiny import build_tiny
from engine.measure.capture_cache import capture_model
from engine.running.memplan import parse_bytes, plan_run
from engine.running.runner import run_tool

TEXTS = [
    "The cat sat on the mat.",
    "Paris is the capital of France, and a big city.",
    "hello",
    "Water boils at one hundred degrees Celsius at sea level, and freezes at zero.",
]
MODULES = {
    "tiny-llama-a": (
        ["blocks.1.attn.q", "blocks.3.mlp.down"],
        ["blocks.2.mlp.down", "blocks.0.attn.k", "blocks.0.attn.q"],
    ),
    "tiny-gpt2-a": (["blocks.1.attn.qkv"], ["blocks.2.mlp.down", "blocks.0.mlp.up"]),
}


def save_tiny(tmp_path_factory, names) -> dict[str, str]:
    """The named tiny models saved as Hugging Face folders (safetensors and tokenizer): name -> path."""
    out = {}
    for name in names:
        d = tmp_path_factory.mktemp(name)
        model, tok = build_tiny(name)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out[name] = str(d)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny(tmp_path_factory, ("tiny-llama-a", "tiny-llama-b", "tiny-gpt2-a", "tiny-gpt2-b"))


def _all_meta(m) -> bool:
    return all(p.device.type == "meta" for p in m.model.parameters())


@pytest.mark.parametrize("name", ["tiny-llama-a", "tiny-gpt2-a"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_streamed_capture_equals_the_whole_model(folders, name, batch_size, one_thread):
    spec = ModelSpec.parse(folders[name])
    whole = load_model(spec, "cpu", "float32")
    streamed = load_model(spec, "cpu", "float32", stream=True)
    assert streamed.streamed and _all_meta(streamed)
    mods, ins = MODULES[name]
    a = capture_model(whole, TEXTS, modules=mods, module_inputs=ins, batch_size=batch_size)
    b = capture_model(streamed, TEXTS, modules=mods, module_inputs=ins, batch_size=batch_size)
    assert a.residual.shape == b.residual.shape and a.residual.shape[0] == whole.arch.n_layers + 1
    assert torch.allclose(a.residual, b.residual, atol=1e-6, rtol=0)
    for m in mods:
        assert torch.allclose(a.modules[m], b.modules[m], atol=1e-6, rtol=0)
    for m in ins:
        assert torch.allclose(a.module_inputs[m], b.module_inputs[m], atol=1e-6, rtol=0)
    assert a.token_ids == b.token_ids and torch.equal(a.text_index, b.text_index)
    # every weight was read once, and dropped again: the skeleton holds no weights afterwards
    assert _all_meta(streamed)
    weights = sum(p.numel() * 4 for n, p in whole.model.named_parameters() if "lm_head" not in n)
    assert streamed.stream.bytes_read == pytest.approx(weights, rel=0.01)


def test_a_cancel_mid_stream_leaves_no_weights_behind(folders, one_thread):
    streamed = load_model(ModelSpec.parse(folders["tiny-llama-a"]), "cpu", "float32", stream=True)
    seen = []

    def cb(frac, msg):
        seen.append(msg)
        if "block 3/" in msg:
            pr.cancel()

    pr = Progress(cb)
    with pytest.raises(Cancelled):
        capture_model(streamed, TEXTS, progress=pr)
    assert any("GB read" in m for m in seen)  # progress is in bytes
    assert _all_meta(streamed)
    cap = capture_model(streamed, TEXTS)  # and the model still works
    assert torch.isfinite(cap.residual).all()


@pytest.mark.parametrize("tool", ["compat", "cka", "procrustes", "bridge-check"])
@pytest.mark.parametrize("pair", [("tiny-llama-a", "tiny-llama-b"), ("tiny-gpt2-a", "tiny-llama-b")])
def test_t1_to_t4_streamed_equal_in_memory(folders, workload, tool, pair, one_thread):
    d, t = (ModelSpec.parse(folders[p]) for p in pair)
    runs = {}
    for stream in ("off", "on"):
        env = run_tool(tool, d, t, {"workload": workload, "stream": stream, "device": "cpu"})
        json.dumps(env, allow_nan=False)
        assert env["meta"]["memory_plan"]["route"] == ("whole" if stream == "off" else "stream")
        runs[stream] = env["result"]
    _close(runs["off"], runs["on"])


def _close(a, b, path="result"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k == "warnings":  # they quote the memory plan, whose peak depends on the route
                assert len(a[k]) == len(b[k]), path
                continue
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-4), path
    else:
        assert a == b, path


def test_bfloat16_streamed_t1_to_t4_give_results(folders, workload, one_thread):
    d, t = ModelSpec.parse(folders["tiny-llama-a"]), ModelSpec.parse(folders["tiny-llama-b"])
    for tool in ("compat", "cka", "procrustes", "bridge-check"):
        env = run_tool(tool, d, t, {"workload": workload, "stream": "on", "dtype": "bfloat16"})
        json.dumps(env, allow_nan=False)
    assert env["meta"]["bytes_read"] > 0


def test_parse_bytes():
    assert parse_bytes("8GiB") == 8 * 1024**3
    assert parse_bytes("8 GB") == 8 * 1000**3
    assert parse_bytes("512m") == 512 * 1024**2
    assert parse_bytes("1.5TiB") == int(1.5 * 1024**4)
    assert parse_bytes("") is None
    for bad in ("eight", "8XB", "-1G", "1k"):
        with pytest.raises(GraftError):
            parse_bytes(bad)


def test_plan_streams_only_when_the_pair_does_not_fit_whole(folders):
    specs = [ModelSpec.parse(folders["tiny-llama-a"]), ModelSpec.parse(folders["tiny-llama-b"])]
    roomy = plan_run(specs, dtype="float32", device=torch.device("cpu"), tokens=512, max_memory="8GiB")
    assert roomy.route == "whole" and roomy.fits
    assert roomy.read_bytes == sum(m["weights_bytes"] for m in roomy.models) > 0
    assert roomy.stream_peak_bytes < roomy.whole_peak_bytes
    budget = str((roomy.stream_peak_bytes + roomy.whole_peak_bytes) // 2)  # plain bytes
    tight = plan_run(specs, dtype="float32", device=torch.device("cpu"), tokens=512, max_memory=budget)
    assert tight.route == "stream" and tight.fits
    assert roomy.t3_tokens_needed > 64  # width 64: a determined fit needs more rows than that


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_refuses_a_budget_nothing_fits_in_one_line(folders, tmp_path):
    out = tmp_path / "x.json"
    r = _cli("cka", "--donor", folders["tiny-llama-a"], "--target", folders["tiny-llama-b"], "--max-memory",
             "100MiB", "--json", str(out), "--quiet")  # fmt: skip
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "budget" in lines[0], r.stderr
    assert not out.exists()
    r = _cli(
        "sweep-k",
        "--donor",
        folders["tiny-llama-a"],
        "--target",
        folders["tiny-llama-b"],
        "--stream",
        "on",
        "--quiet",
    )
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "does not stream" in lines[0], r.stderr
    r = _cli(
        "cka", "--donor", folders["tiny-llama-a"], "--target", folders["tiny-llama-b"], "--max-memory", "lots"
    )
    assert r.returncode == 2 and "not a size" in r.stderr


@pytest.mark.real
def test_smollm2_streamed_equals_in_memory(workload):
    spec = ModelSpec.parse("smollm2-135m-instruct")
    runs = {}
    for stream in ("off", "on"):
        runs[stream] = run_tool(
            "procrustes", spec, spec, {"workload": workload, "stream": stream, "device": "cpu"}
        )
    _close(runs["off"]["result"], runs["on"]["result"])
    assert runs["on"]["meta"]["bytes_read"] > 100e6  # read block by block


def test_debiased_cka_matches_the_unbiased_hsic_definition_and_removes_the_bias():
    """Few rows against the width: linear CKA of unrelated random layers runs high (about 0.9 here);
    debiased CKA equals the unbiased HSIC estimator computed by definition on the uncentred Gram
    matrices, sits near 0 for unrelated layers, and gives 1 for a layer and its rotation."""
    from engine.measure.cka import DEBIASED, LINEAR, choose_estimator, cka_matrix

    g = torch.Generator().manual_seed(0)
    n, d = 64, 512
    X, Y = torch.randn(2, n, d, generator=g) + 0.5, torch.randn(2, n, d, generator=g)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    Y[0] = X[1] @ Q
    lin = cka_matrix(X, Y, estimator=LINEAR)
    info = {}
    deb = cka_matrix(X, Y, estimator=DEBIASED, info=info)
    assert info["estimator"] == DEBIASED and info["form"] in ("gram", "feature")
    assert lin[0, 1] > 0.8 and abs(float(deb[0, 1])) < 0.1
    assert float(deb[1, 0]) == pytest.approx(1.0, abs=1e-6)

    def hsic1(K, L):
        K, L = K.clone(), L.clone()
        K.fill_diagonal_(0)
        L.fill_diagonal_(0)
        one = torch.ones(n, dtype=K.dtype)
        return (
            torch.trace(K @ L)
            + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ K @ L @ one)
        ) / (n * (n - 3))

    x, y = X[0].double(), Y[1].double()  # uncentred: the estimator does not depend on centring
    K, L = x @ x.T, y @ y.T
    want = float(hsic1(K, L) / torch.sqrt(hsic1(K, K) * hsic1(L, L)))
    assert float(deb[0, 1]) == pytest.approx(want, abs=1e-5)
    assert choose_estimator(64, 512, 256) == DEBIASED and choose_estimator(600, 512, 256) == LINEAR


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_capture_on_cuda_equals_the_whole_model(folders, dtype):
    """On a GPU every block is read to the device, run there, and dropped; the rows equal those of
    the model held whole on the GPU (bfloat16: the same kernels, so the same rows)."""
    spec = ModelSpec.parse(folders["tiny-llama-a"])
    whole = load_model(spec, "cuda", dtype)
    streamed = load_model(spec, "cuda", dtype, stream=True)
    a = capture_model(whole, TEXTS)
    b = capture_model(streamed, TEXTS)
    assert torch.allclose(a.residual, b.residual, atol=1e-5 if dtype == "float32" else 1e-2, rtol=0)
    assert _all_meta(streamed)


OTHER_FAMILIES = {
    # sliding-window and full-attention layers take different masks: the dry pass keeps each layer's
    "gemma3_text": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
    "qwen2": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),  # fmt: skip
    "phi": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        partial_rotary_factor=0.5,
    ),  # fmt: skip
    "gpt_neox": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, rotary_pct=0.25
    ),  # fmt: skip
}


@pytest.mark.parametrize("model_type", sorted(OTHER_FAMILIES))
def test_streamed_capture_equals_the_whole_model_in_other_families(tmp_path, model_type, one_thread):
    from transformers import AutoConfig, AutoModelForCausalLM

    _, tok = build_tiny("tiny-llama-a")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=len(tok), max_position_embeddings=256, **OTHER_FAMILIES[model_type]
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    spec = ModelSpec.parse(str(tmp_path))
    a = capture_model(load_model(spec, "cpu", "float32"), TEXTS, batch_size=2)
    b = capture_model(load_model(spec, "cpu", "float32", stream=True), TEXTS, batch_size=2)
    assert a.residual.shape == b.residual.shape
    assert torch.allclose(a.residual, b.residual, atol=1e-6, rtol=0)


def test_a_folder_missing_a_weight_is_refused_in_one_line_before_any_block_is_read(folders, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "cut"
    shutil.copytree(folders["tiny-llama-a"], d)
    tensors = load_file(str(d / "model.safetensors"))
    gone = next(k for k in tensors if ".layers.2." in k)
    del tensors[gone]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GraftError, match="no tensor for") as exc:
        load_model(ModelSpec.parse(str(d)), "cpu", "float32", stream=True)
    assert "\n" not in str(exc.value) and gone.split("model.", 1)[-1] in str(exc.value)
