"""Rotated twin (engine/surgery/twin.py, engine/surgery/twin_check.py): function preservation, plain merge vs
conjugation, saving."""

import json
import threading

import pytest
import torch
from torch import nn

from engine.core.errors import Cancelled, GraftError
from engine.core.progress import Progress
from engine.loading.arch import ArchAdapter
from engine.loading.models import LoadedModel, ModelSpec, load_model, state_dict_hash
from engine.loading.tiny import build_tiny
from engine.surgery.twin import (
    ROTATION_FILE,
    TWIN_CARD,
    check_supported,
    make_twin,
    norm_gain,
    random_orthogonal,
    rotate_model,
    rotation_sha256,
)
from engine.surgery.twin_check import max_logit_diff, twin_report

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Light travels faster than sound, which is why we see lightning first.",
]
REL_TOL = 1e-4


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _trained_like(model: nn.Module, seed: int = 5, gemma: bool = False) -> nn.Module:
    """Give the (all-ones at init) norm weights random per-channel gains, as after training, so a
    missing or wrong fold would show. In place on a freshly built tiny model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                g = 1.0 + 0.4 * torch.randn(p.shape, generator=gen)
                p.copy_(g - 1.0 if gemma else g)
    return model


def _llama(tied: bool = False):
    model, tok = build_tiny("tiny-llama-a")
    if tied:
        from transformers import AutoModelForCausalLM

        cfg = model.config.__class__(**{**model.config.to_dict(), "tie_word_embeddings": True})
        torch.manual_seed(2)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return _trained_like(model), tok


def _logits(model, tok, texts=TEXTS):
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            out.append(model(input_ids=ids).logits[0].double())
    return torch.cat(out)


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


def test_twin_preserves_logits_and_changes_weights():
    model, tok = _llama()
    before = state_dict_hash(model.state_dict())
    twin, q = rotate_model(model, seed=0)
    assert state_dict_hash(model.state_dict()) == before  # input not mutated
    assert twin is not model
    d = model.config.hidden_size
    assert q.shape == (d, d) and q.dtype == torch.float32
    assert torch.allclose(q.double() @ q.double().T, torch.eye(d, dtype=torch.float64), atol=1e-6)
    assert _rel(_logits(model, tok), _logits(twin, tok)) < REL_TOL
    rep = twin_report(model, twin, tok, TEXTS)
    assert rep["ok"] and rep["rel_diff"] < REL_TOL and rep["top1_agreement"] == 1.0
    assert max_logit_diff(model, twin, tok, TEXTS) == pytest.approx(rep["max_abs_diff"])
    # weights really differ, everywhere the residual stream is touched
    sd, st = model.state_dict(), twin.state_dict()
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
    ):
        assert (sd[name] - st[name]).abs().max() > 1e-2, name
    # norms folded to unit gain
    for name, p in twin.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            assert torch.equal(p, torch.ones_like(p)), name
    # the residual stream really is rotated: h_twin = h_base @ Q
    ids = tok(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hb = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0].double()
        ht = twin(input_ids=ids, output_hidden_states=True).hidden_states[2][0].double()
    assert float((hb @ q.double() - ht).abs().max() / hb.abs().max()) < 1e-4
    assert float((hb - ht).abs().max() / hb.abs().max()) > 0.1


def test_seeds_reproducible_and_distinct():
    model, _ = _llama()
    t1, q1 = rotate_model(model, 1)
    t1b, q1b = rotate_model(model, 1)
    t2, q2 = rotate_model(model, 2)
    assert rotation_sha256(q1) == rotation_sha256(q1b) and torch.equal(q1, q1b)
    assert rotation_sha256(q1) != rotation_sha256(q2)
    assert state_dict_hash(t1.state_dict()) == state_dict_hash(t1b.state_dict())
    assert state_dict_hash(t1.state_dict()) != state_dict_hash(t2.state_dict())
    q = random_orthogonal(16, 3)
    assert torch.allclose(q.T @ q, torch.eye(16, dtype=torch.float64), atol=1e-12)
    with pytest.raises(GraftError):
        rotate_model(model, "not a seed")


def _add(model, path, delta):
    mod = model.get_submodule(path)
    with torch.no_grad():
        mod.weight.add_(delta.to(mod.weight.dtype))


def _planted(model, seed=11, rank=4, scale=3.0):
    """A LoRA-style delta (B @ A) per planted module, ``scale`` times as large as the weight."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path in (
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.2.mlp.up_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.0.self_attn.o_proj",
        "lm_head",
    ):
        w = model.get_submodule(path).weight.detach()
        b = torch.randn(w.shape[0], rank, generator=gen, dtype=torch.float64)
        a = torch.randn(rank, w.shape[1], generator=gen, dtype=torch.float64)
        dw = b @ a
        out[path] = dw * (scale * float(w.double().norm()) / float(dw.norm()))
    return out


def _conjugate(model, q, path, dw):
    """Ground truth: dW in the twin's coordinates, from Q and the base's (unfolded) norm gains."""
    q = q.double()
    if path == "lm_head":
        return dw * norm_gain(model.model.norm, False)[None, :] @ q
    layer = model.model.layers[int(path.split(".")[2])]
    if path.endswith(("q_proj", "k_proj", "v_proj")):
        return dw * norm_gain(layer.input_layernorm, False)[None, :] @ q
    if path.endswith(("gate_proj", "up_proj")):
        return dw * norm_gain(layer.post_attention_layernorm, False)[None, :] @ q
    return q.T @ dw  # o_proj, down_proj write into the residual


def test_plain_merge_fails_conjugation_recovers():
    import copy

    model, tok = _llama()
    twin, q = rotate_model(model, seed=7)
    base_logits = _logits(model, tok)
    twin_logits = _logits(twin, tok)
    deltas = _planted(model)
    for only in (["model.layers.1.self_attn.q_proj"], list(deltas)):  # one module, then all of them
        donor, plain, conj = copy.deepcopy(model), copy.deepcopy(twin), copy.deepcopy(twin)
        for path in only:
            _add(donor, path, deltas[path])
            _add(plain, path, deltas[path])  # as if the coordinates matched
            _add(conj, path, _conjugate(model, q, path, deltas[path]))
        effect = _logits(donor, tok) - base_logits
        plain_effect = _logits(plain, tok) - twin_logits
        conj_effect = _logits(conj, tok) - twin_logits
        # the planted effect must stand far above the twin's rounding noise to be a fair test
        assert float(effect.norm()) > 1e3 * float((twin_logits - base_logits).norm()), (
            "planted delta too weak"
        )
        plain_err = float((plain_effect - effect).norm() / effect.norm())
        conj_err = float((conj_effect - effect).norm() / effect.norm())
        assert plain_err > 0.5, (only, plain_err)
        assert conj_err < 1e-3, (only, conj_err)
        cos = float(torch.nn.functional.cosine_similarity(plain_effect.flatten(), effect.flatten(), dim=0))
        assert cos < 0.7, cos  # the plain merge's effect points elsewhere


def test_tied_head_is_untied():
    model, tok = _llama(tied=True)
    desc = check_supported(model)
    assert desc["untied_lm_head"] is True
    twin, _ = rotate_model(model, 3)
    assert model.config.tie_word_embeddings is True  # the input's config is untouched
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert twin.config.tie_word_embeddings is False
    assert twin.lm_head.weight.data_ptr() != twin.model.embed_tokens.weight.data_ptr()
    assert _rel(_logits(model, tok), _logits(twin, tok)) < REL_TOL


def _loaded(model, tok, name="tiny-llama-a"):
    return LoadedModel(
        ModelSpec("builtin", name), model, tok, ArchAdapter(model), torch.device("cpu"), torch.float32, ""
    )


def test_make_twin_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = _llama(tied=True)
    base = _loaded(model, tok)
    before = base.state_hash()
    seen = []
    out = tmp_path / "twin"
    card = make_twin(base, 4, out, Progress(lambda f, m: seen.append(f)), save_rotation=True)
    assert base.state_hash() == before
    assert seen and seen[-1] == pytest.approx(1.0) and all(a <= b + 1e-9 for a, b in zip(seen, seen[1:]))
    on_disk = json.loads((out / TWIN_CARD).read_text())
    assert on_disk == card
    assert card["seed"] == 4 and card["d"] == 64 and card["base"]["weight_hash"] == before
    assert card["untied_lm_head"] is True and card["verification"]["ok"]
    assert card["verification"]["rel_diff"] < REL_TOL and card["rotation"]["saved"]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not any(p.name.startswith(".twin.tmp") for p in tmp_path.iterdir())

    from safetensors.torch import load_file

    q = load_file(str(out / ROTATION_FILE))["Q"]
    assert rotation_sha256(q) == card["rotation"]["sha256"]
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert reloaded.config.tie_word_embeddings is False
    assert state_dict_hash(reloaded.state_dict()) == card["twin_weight_hash"]
    tok2 = AutoTokenizer.from_pretrained(str(out))
    base_logits = _logits(model, tok)
    assert _rel(base_logits, _logits(reloaded, tok2)) < REL_TOL
    # Graft's own loader takes the folder too
    again = load_model(ModelSpec.parse(str(out)), "cpu")
    assert _rel(base_logits, _logits(again.model, again.tokenizer)) < REL_TOL

    # same seed, rebuilt over the earlier twin: same weights; rotation not kept unless asked
    card2 = make_twin(base, 4, out)
    assert card2["twin_weight_hash"] == card["twin_weight_hash"]
    assert card2["rotation"]["sha256"] == card["rotation"]["sha256"]
    assert not (out / ROTATION_FILE).exists() and card2["rotation"]["saved"] is False


def test_make_twin_refuses_foreign_folder_and_cancels(tmp_path):
    model, tok = _llama()
    base = _loaded(model, tok)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(GraftError, match="not a Graft twin"):
        make_twin(base, 0, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(GraftError):
        make_twin(base, 0, tmp_path / "afile")
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        make_twin(base, 0, tmp_path / "cancelled", Progress(cancel_event=ev))
    assert not (tmp_path / "cancelled").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(GraftError, match="not function-preserving"):
        make_twin(base, 0, tmp_path / "strict", tolerance=1e-30)
    assert not (tmp_path / "strict").exists()


def _one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


def test_gpt2_refused_one_line():
    model, _ = build_tiny("tiny-gpt2-a")
    with pytest.raises(GraftError) as e:
        rotate_model(model, 0)
    msg = _one_line(e)
    assert "GPT-2" in msg and "mean" in msg


def test_gemma3_refused_one_line():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=32,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    with pytest.raises(GraftError) as e:
        rotate_model(model, 0)
    msg = _one_line(e)
    assert "Gemma 3" in msg and "post_feedforward_layernorm" in msg


def test_gemma1_supported_with_one_plus_w_norms():
    """Gemma (1): RMSNorm gain 1 + w, scaled embedding sqrt(d), tied head."""
    from transformers import GemmaConfig, GemmaForCausalLM

    _, tok = build_tiny("tiny-llama-a")
    cfg = GemmaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = _trained_like(GemmaForCausalLM(cfg).eval(), gemma=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    twin, q = rotate_model(model, 9)
    assert _rel(_logits(model, tok), _logits(twin, tok)) < REL_TOL
    for name, p in twin.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            assert torch.equal(p, torch.zeros_like(p)), name  # gain 1 + 0
    assert twin.config.tie_word_embeddings is False


@pytest.mark.parametrize("family", ["llama-biases", "qwen2", "qwen3", "mistral"])
def test_llama_layout_families(family):
    """Writer biases (o_proj / down_proj: b Q), reader biases (Qwen2 q/k/v: unchanged), per-head
    q_norm / k_norm (Qwen3: unchanged), sliding-window Mistral."""
    import transformers as tf

    _, tok = build_tiny("tiny-llama-a")
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    if family == "llama-biases":
        cfg, cls = tf.LlamaConfig(**common, attention_bias=True, mlp_bias=True), tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg, cls = tf.Qwen3Config(**common, head_dim=16), tf.Qwen3ForCausalLM
    else:
        cfg, cls = tf.MistralConfig(**common, sliding_window=8), tf.MistralForCausalLM
    torch.manual_seed(1)
    model = _trained_like(cls(cfg).eval())
    with torch.no_grad():  # biases start at zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    twin, _ = rotate_model(model, 5)
    assert _rel(_logits(model, tok), _logits(twin, tok)) < REL_TOL
    if family == "llama-biases":
        b, bt = model.model.layers[0].mlp.down_proj.bias, twin.model.layers[0].mlp.down_proj.bias
        assert (b - bt).abs().max() > 1e-2


def test_make_twin_cli_writes_a_loadable_twin_with_its_card(tmp_path, capsys):
    from engine.cli import main
    from engine.loading.models import ModelSpec, model_card

    out = tmp_path / "twin"
    assert main(["make-twin", "--base", "tiny-llama-a", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    card = model_card(ModelSpec.parse(str(out)))
    assert card["kind"] == "twin" and card["card"]["seed"] == 3
    assert main(["make-twin", "--base", "tiny-llama-a", "--seed", "x", "--out", str(out), "--quiet"]) == 2
    assert main(["make-twin", "--base", "tiny-gpt2-a", "--out", str(tmp_path / "g"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--seed expects int" in err and "internal" not in err
