"""The architecture adapter on a tiny random config of every supported family."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    Qwen2Config,
)

from engine.core.errors import GraftError
from engine.loading.arch import ArchAdapter, linear_weight_out_in

FAMILIES = {
    "gpt2": (
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=0),
        "gpt2",
        {"attn.qkv", "attn.o", "mlp.up", "mlp.down"},
    ),
    "gpt_neox": (
        GPTNeoXConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=128
        ),
        "gpt_neox",
        {"attn.qkv", "attn.o", "mlp.up", "mlp.down"},
    ),
    "llama": (
        LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=128,
        ),
        "llama",
        {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"},
    ),
    "mistral": (
        MistralConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=128,
        ),
        "llama",
        {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"},
    ),
    "qwen2": (
        Qwen2Config(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=128,
        ),
        "llama",
        {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"},
    ),
    "gemma3": (
        Gemma3TextConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
            vocab_size=128,
        ),
        "gemma",
        {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"},
    ),
    "phi": (
        PhiConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=128
        ),
        "phi",
        {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"},
    ),
}


def build(name):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[name][0]).eval()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_adapter_names_every_family(name):
    model = build(name)
    a = ArchAdapter(model)
    assert a.family == FAMILIES[name][1]
    assert a.n_layers == 2
    assert a.hidden_size == 32
    mods = a.linear_modules()
    assert {m.canonical for m in mods} == FAMILIES[name][2]
    assert len(mods) == 2 * len(FAMILIES[name][2])
    for m in mods:
        w = linear_weight_out_in(a.module(m.path))
        assert tuple(w.shape) == m.shape
        assert m.kind == ("attention" if m.canonical.startswith("attn") else "mlp")
    # the residual stream really flows through the named blocks and final norm
    seen = []
    h = a.final_norm.register_forward_hook(lambda *_: seen.append("norm"))
    h2 = a.blocks[1].register_forward_hook(lambda *_: seen.append("block1"))
    model(torch.tensor([[1, 2, 3]]))
    h.remove()
    h2.remove()
    assert seen == ["block1", "norm"]
    desc = a.describe()
    assert desc["n_layers"] == 2 and desc["vocab_size"] == 128


def test_gpt2_fused_conv1d_qkv_shape_is_out_in():
    a = ArchAdapter(build("gpt2"))
    qkv = [m for m in a.linear_modules() if m.canonical == "attn.qkv"][0]
    assert qkv.conv1d and qkv.shape == (96, 32)
    up = [m for m in a.linear_modules() if m.canonical == "mlp.up"][0]
    assert up.shape == (128, 32)


def test_unsupported_family_is_a_clear_error():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(
        BertConfig(
            num_hidden_layers=1,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=64,
            is_decoder=True,
        )
    )
    with pytest.raises(GraftError, match="unsupported architecture 'bert'"):
        ArchAdapter(model)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_capture_backbone_skips_the_lm_head_and_gives_the_same_block_outputs(name):
    """The capture runs the base model: the LM head is never called, and every block's output is
    what the full model's forward gives."""
    from types import SimpleNamespace

    from engine.measure.capture import backbone

    model = build(name)
    a = ArchAdapter(model)
    net = backbone(SimpleNamespace(model=model, arch=a))
    assert net is not model
    head_calls, outs = [], {}
    model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    hooks = [
        b.register_forward_hook(
            lambda _m, _i, o, l=l: outs.setdefault(l, []).append(
                (o[0] if isinstance(o, tuple) else o).clone()
            )
        )
        for l, b in enumerate(a.blocks)
    ]
    ids = torch.tensor([[5, 9, 3, 7, 1], [2, 4, 6, 8, 10]])
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        assert head_calls == [1]
        net(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    assert head_calls == [1]
    for l in range(a.n_layers):
        full, base = outs[l]
        assert torch.equal(full, base)
