"""What the rotated twin's construction (:mod:`engine.surgery.twin`) touches in a model, validated
before anything is copied: the supported families, the residual stream's readers and writers in a
block (in the one vocabulary of :mod:`engine.loading.arch`), and the norms folded into them."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.errors import GraftError
from ..loading.arch import LAYOUTS, READS_RESIDUAL, WRITES_RESIDUAL

# Families whose block layout the construction knows (config.model_type -> family description).
_LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
_GEMMA_TYPES = ("gemma",)
SUPPORTED_TYPES = _LLAMA_TYPES + _GEMMA_TYPES

_LAYERNORM_TYPES = {
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX",
    "phi": "Phi",
    "gptj": "GPT-J",
    "opt": "OPT",
    "bloom": "BLOOM",
    "falcon": "Falcon",
    "stablelm": "StableLM",
}
_SANDWICH_TYPES = {"gemma2": "Gemma 2", "gemma3": "Gemma 3", "gemma3_text": "Gemma 3"}

# In-block parameters (reader / writer / inside, which norm feeds it), in the one vocabulary of
# engine.loading.arch: the Llama layout's paths of the canonical readers and writers.
LLAMA_LINEARS = LAYOUTS["llama"].linears
READERS_ATTN = tuple(LLAMA_LINEARS[c] for c in READS_RESIDUAL if c.startswith("attn.") and c in LLAMA_LINEARS)
WRITER_ATTN = next(LLAMA_LINEARS[c] for c in WRITES_RESIDUAL if c.startswith("attn."))
READERS_MLP = tuple(LLAMA_LINEARS[c] for c in READS_RESIDUAL if c.startswith("mlp.") and c in LLAMA_LINEARS)
WRITER_MLP = next(LLAMA_LINEARS[c] for c in WRITES_RESIDUAL if c.startswith("mlp."))
INSIDE = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")  # per-head norms (Qwen3): not residual
NORM_ATTN = "input_layernorm"
NORM_MLP = "post_attention_layernorm"


def _refuse(model_type: str) -> None:
    if model_type in _LAYERNORM_TYPES:
        raise GraftError(
            f"rotated twin: {_LAYERNORM_TYPES[model_type]} ({model_type}) is not supported: its LayerNorm "
            "subtracts the mean (projects out the all-ones direction), which does not commute with a "
            "rotation "
            f"of the residual stream; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    if model_type in _SANDWICH_TYPES:
        raise GraftError(
            f"rotated twin: {_SANDWICH_TYPES[model_type]} ({model_type}) is not supported: its "
            "post_attention_layernorm / post_feedforward_layernorm normalise each block's output before the "
            "residual add, so their per-channel weights cannot be folded into any linear layer and do not "
            f"commute with a rotation; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    raise GraftError(
        f"rotated twin: architecture '{model_type}' is not supported; supported: {', '.join(SUPPORTED_TYPES)}"
    )


class TwinPlan:
    """What the construction touches in one model (validated before anything is copied)."""

    def __init__(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        model_type = str(getattr(config, "model_type", "") or type(model).__name__)
        if model_type not in SUPPORTED_TYPES:
            _refuse(model_type)
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        head = getattr(model, "lm_head", None)
        if (
            not isinstance(layers, nn.ModuleList)
            or not isinstance(getattr(inner, "embed_tokens", None), nn.Embedding)
            or not isinstance(head, nn.Linear)
            or getattr(inner, "norm", None) is None
        ):
            raise GraftError(
                f"rotated twin: {type(model).__name__} is not a plain causal LM of the {model_type} "
                "layout (model.layers, model.embed_tokens, model.norm, lm_head)"
            )
        self.model_type = model_type
        self.gemma = model_type in _GEMMA_TYPES  # RMSNorm multiplies by (1 + w)
        self.n_layers = len(layers)
        self.d = int(inner.embed_tokens.weight.shape[1])
        known_top = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "lm_head.bias"}
        known_block = (
            {
                f"{m}.{p}"
                for m in READERS_ATTN + READERS_MLP + (WRITER_ATTN, WRITER_MLP)
                for p in ("weight", "bias")
            }
            | set(INSIDE)
            | {f"{NORM_ATTN}.weight", f"{NORM_MLP}.weight"}
        )
        for name, _ in model.named_parameters(remove_duplicate=False):
            if name.startswith("model.layers."):
                rel = name.split(".", 3)[3]
                if rel not in known_block:
                    raise GraftError(
                        f"rotated twin: unexpected parameter {name} in a {model_type} block: "
                        "cannot prove the twin would be function-preserving"
                    )
            elif name not in known_top:
                raise GraftError(f"rotated twin: unexpected parameter {name} in this {model_type} model")
        for i, block in enumerate(layers):
            for rel in READERS_ATTN + READERS_MLP + (WRITER_ATTN, WRITER_MLP):
                if not isinstance(block.get_submodule(rel), nn.Linear):
                    raise GraftError(f"rotated twin: model.layers.{i}.{rel} is not a linear layer")
            for rel in (NORM_ATTN, NORM_MLP):
                w = getattr(block.get_submodule(rel), "weight", None)
                if w is None or tuple(w.shape) != (self.d,):
                    raise GraftError(
                        f"rotated twin: model.layers.{i}.{rel} is not a per-channel norm of width {self.d}"
                    )
        for attr in ("norm_type", "layer_norm_type"):
            if str(getattr(config, attr, "") or "").lower().startswith("layer"):
                raise GraftError(
                    f"rotated twin: {attr}={getattr(config, attr)} (LayerNorm) does not commute with a "
                    "rotation"
                )
        self.tied = (
            head.weight is inner.embed_tokens.weight
            or head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()
        )
        self.has_writer_bias = any(
            getattr(b.get_submodule(rel), "bias", None) is not None
            for b in layers
            for rel in (WRITER_ATTN, WRITER_MLP)
        )
        self.has_reader_bias = any(
            getattr(b.get_submodule(rel), "bias", None) is not None
            for b in layers
            for rel in READERS_ATTN + READERS_MLP
        )

    def describe(self) -> dict[str, Any]:
        """What was folded, untied and rotated (for the card)."""
        gain = "1 + weight (set weight = 0)" if self.gemma else "weight (set weight = 1)"
        return {
            "model_type": self.model_type,
            "norm_gain": gain,
            "folded": [
                {
                    "norm": f"model.layers.*.{NORM_ATTN}",
                    "into": ["q_proj", "k_proj", "v_proj"],
                    "count": self.n_layers,
                },
                {
                    "norm": f"model.layers.*.{NORM_MLP}",
                    "into": ["gate_proj", "up_proj"],
                    "count": self.n_layers,
                },
                {"norm": "model.norm", "into": ["lm_head"], "count": 1},
            ],
            "untied_lm_head": bool(self.tied),
            "rotated_inputs": [
                "model.embed_tokens (E Q)",
                "q_proj",
                "k_proj",
                "v_proj",
                "gate_proj",
                "up_proj",
                "lm_head (W Q)",
            ],
            "rotated_outputs": ["o_proj", "down_proj (Q^T W, bias b Q)"]
            if self.has_writer_bias
            else ["o_proj", "down_proj (Q^T W)"],
            "unchanged": [
                "reader biases",
                "per-head q_norm / k_norm",
                "rotary embeddings",
                "embedding scale",
            ],
        }


def check_supported(model: nn.Module) -> dict[str, Any]:
    """Raise a one-line GraftError unless a rotated twin of ``model`` can be built; else say what
    the construction will fold, untie and rotate (cheap: reads structure only)."""
    return TwinPlan(model).describe()
