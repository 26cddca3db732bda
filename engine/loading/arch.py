"""Architecture adapter: one vocabulary for every supported decoder family.

Every family exposes the same names: ``blocks`` (the transformer layers, in order),
``embeddings``, ``final_norm``, ``head`` and, per block, linear modules named as in
docs/methods.md: ``attn.q``, ``attn.k``, ``attn.v``, ``attn.o`` (``attn.qkv`` where fused, as in
GPT-2 and GPT-NeoX), ``mlp.up``, ``mlp.gate``, ``mlp.down``.

GPT-2 uses ``Conv1D`` whose weight is stored as ``(in, out)``; :class:`LinearModule` reports
shapes as ``(out, in)`` for every family so shapes compare across families.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..core.errors import GraftError


@dataclass(frozen=True)
class FamilyLayout:
    family: str
    blocks: str  # dotted path to the ModuleList of blocks
    embeddings: str
    final_norm: str
    head: str
    linears: dict[str, str]  # canonical name -> path inside a block
    positional: str


_LLAMA_LINEARS = {
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}

LAYOUTS: dict[str, FamilyLayout] = {
    "gpt2": FamilyLayout(
        "gpt2",
        "transformer.h",
        "transformer.wte",
        "transformer.ln_f",
        "lm_head",
        {"attn.qkv": "attn.c_attn", "attn.o": "attn.c_proj", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"},
        "learned absolute",
    ),
    "gpt_neox": FamilyLayout(
        "gpt_neox",
        "gpt_neox.layers",
        "gpt_neox.embed_in",
        "gpt_neox.final_layer_norm",
        "embed_out",
        {
            "attn.qkv": "attention.query_key_value",
            "attn.o": "attention.dense",
            "mlp.up": "mlp.dense_h_to_4h",
            "mlp.down": "mlp.dense_4h_to_h",
        },
        "rotary",
    ),
    "llama": FamilyLayout(
        "llama", "model.layers", "model.embed_tokens", "model.norm", "lm_head", _LLAMA_LINEARS, "rotary"
    ),
    "gemma": FamilyLayout(
        "gemma", "model.layers", "model.embed_tokens", "model.norm", "lm_head", _LLAMA_LINEARS, "rotary"
    ),
    "phi": FamilyLayout(
        "phi",
        "model.layers",
        "model.embed_tokens",
        "model.final_layernorm",
        "lm_head",
        {
            "attn.q": "self_attn.q_proj",
            "attn.k": "self_attn.k_proj",
            "attn.v": "self_attn.v_proj",
            "attn.o": "self_attn.dense",
            "mlp.up": "mlp.fc1",
            "mlp.down": "mlp.fc2",
        },
        "rotary (partial)",
    ),
}


# The residual stream's readers and writers among the canonical linears: what a rotation of the
# stream (the twin) turns on its input side and on its output side.
READS_RESIDUAL = ("attn.q", "attn.k", "attn.v", "attn.qkv", "mlp.gate", "mlp.up")
WRITES_RESIDUAL = ("attn.o", "mlp.down")

# Path parts that mark a module of another layout (an adapter's target names) as attention or MLP.
ATTN_PARTS = {
    "attn",
    "attention",
    "self_attn",
    "self_attention",
    "cross_attn",
    "crossattention",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "c_attn",
    "query_key_value",
    "wqkv",
    "query",
    "key",
    "value",
    "wq",
    "wk",
    "wv",
    "wo",
    "out_proj",
}
MLP_PARTS = {
    "mlp",
    "ffn",
    "feed_forward",
    "feedforward",
    "ff",
    "experts",
    "moe",
    "up_proj",
    "gate_proj",
    "down_proj",
    "gate_up_proj",
    "c_fc",
    "fc1",
    "fc2",
    "fc_in",
    "fc_out",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "w1",
    "w2",
    "w3",
}


def kind_of(canonical: str) -> str:
    """``attention`` / ``mlp`` for a canonical name; guessed from the parts of any other path."""
    if canonical.startswith("attn."):
        return "attention"
    if canonical.startswith("mlp."):
        return "mlp"
    parts = {p.lower() for p in canonical.split(".")}
    if parts & ATTN_PARTS:
        return "attention"
    if parts & MLP_PARTS:
        return "mlp"
    return "other"


# model_type -> layout key
_FAMILY_OF = {
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "smollm3": "llama",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3_text": "gemma",
    "phi": "phi",
}

SUPPORTED_MODEL_TYPES = tuple(sorted(_FAMILY_OF))


@dataclass(frozen=True)
class LinearModule:
    """One linear module of one block, in canonical naming."""

    name: str  # e.g. "blocks.3.attn.q"
    layer: int
    canonical: str  # e.g. "attn.q"
    kind: str  # "attention" | "mlp"
    path: str  # real dotted path in the HF model
    shape: tuple[int, int]  # (out_features, in_features), Conv1D transposed to match
    conv1d: bool  # GPT-2 Conv1D: weight stored as (in, out)


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D"


class ArchAdapter:
    """Uniform access to the parts of a supported causal LM."""

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        model_type = getattr(config, "model_type", "?")
        key = _FAMILY_OF.get(model_type)
        if key is None:
            raise GraftError(
                f"unsupported architecture '{model_type}': Graft supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        layout = LAYOUTS[key]
        self.model = model
        self.model_type = model_type
        self.layout = layout
        self.family = layout.family
        self._prefix = ""
        # Multimodal Gemma 3 wraps the text decoder in model.language_model.
        try:
            model.get_submodule(layout.blocks)
        except AttributeError:
            alt = layout.blocks.replace("model.", "model.language_model.", 1)
            try:
                model.get_submodule(alt)
                self._prefix = "language_model."
            except AttributeError as exc:
                raise GraftError(f"cannot find the transformer blocks of this {model_type} model") from exc
        self.text_config = config.get_text_config() if hasattr(config, "get_text_config") else config

    def _path(self, dotted: str) -> str:
        if self._prefix and dotted.startswith("model."):
            return "model." + self._prefix + dotted[len("model.") :]
        return dotted

    # --- parts -----------------------------------------------------------------------
    @property
    def blocks_path(self) -> str:
        return self._path(self.layout.blocks)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)  # type: ignore[return-value]

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def embeddings(self) -> nn.Module:
        return self.model.get_submodule(self._path(self.layout.embeddings))

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self._path(self.layout.final_norm))

    @property
    def head(self) -> nn.Module:
        for path in (self.layout.head, "lm_head", "embed_out"):  # GPT-NeoX renamed embed_out -> lm_head
            try:
                return self.model.get_submodule(path)
            except AttributeError:
                continue
        raise GraftError(f"cannot find the output head of this {self.model_type} model")

    @property
    def hidden_size(self) -> int:
        return int(self.embeddings.weight.shape[1])

    def linear_modules(self) -> list[LinearModule]:
        """All canonical linear modules, block by block, in docs/methods.md naming."""
        out: list[LinearModule] = []
        for layer, block in enumerate(self.blocks):
            for canonical, rel in self.layout.linears.items():
                try:
                    mod = block.get_submodule(rel)
                except AttributeError:
                    continue
                w = mod.weight
                conv = _is_conv1d(mod)
                shape = (int(w.shape[1]), int(w.shape[0])) if conv else (int(w.shape[0]), int(w.shape[1]))
                out.append(
                    LinearModule(
                        name=f"blocks.{layer}.{canonical}",
                        layer=layer,
                        canonical=canonical,
                        kind=kind_of(canonical),
                        path=f"{self.blocks_path}.{layer}.{rel}",
                        shape=shape,
                        conv1d=conv,
                    )
                )
        return out

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    # --- description -----------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Architecture fields compared by T1 (all JSON-serialisable)."""
        c = self.text_config
        n_heads = _first(c, "num_attention_heads", "n_head")
        hidden = self.hidden_size
        kv = _first(c, "num_key_value_heads") or n_heads
        head_dim = _first(c, "head_dim") or (hidden // n_heads if n_heads else None)
        inter = _first(c, "intermediate_size", "n_inner")
        if inter is None and self.family == "gpt2":
            inter = 4 * hidden
        act = _first(c, "hidden_act", "activation_function", "hidden_activation")
        norm = type(self.final_norm).__name__
        norm_type = "rmsnorm" if "rms" in norm.lower() else "layernorm"
        if self.family == "gemma":
            norm_type = "rmsnorm (1+w)"
        positional = self.layout.positional
        rot_pct = _first(c, "rotary_pct", "partial_rotary_factor")
        if rot_pct is not None and positional.startswith("rotary") and float(rot_pct) < 1.0:
            positional = f"rotary (partial {float(rot_pct):g})"
        emb = self.embeddings.weight
        head_w = getattr(self.head, "weight", None)
        tied = head_w is not None and (
            head_w is emb  # a streamed model's tied head shares the parameter (weights on meta: no pointer)
            or (emb.device.type != "meta" and head_w.data_ptr() == emb.data_ptr())
        )
        linear_shapes = {}
        first = [m for m in self.linear_modules() if m.layer == 0]
        for m in first:
            linear_shapes[m.canonical] = list(m.shape)
        return {
            "family": self.family,
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "hidden_size": hidden,
            "n_heads": n_heads,
            "n_kv_heads": kv,
            "head_dim": head_dim,
            "intermediate_size": inter,
            "norm_type": norm_type,
            "activation": act,
            "positional": positional,
            "vocab_size": int(emb.shape[0]),
            "tied_embeddings": bool(tied),
            "dtype": str(emb.dtype).replace("torch.", ""),
            "block_linears": linear_shapes,
            "n_params": int(sum(p.numel() for p in self.model.parameters())),
        }


# Fields a transplant depends on: the compatibility signature hashes exactly these.
SIGNATURE_FIELDS = (
    "family",
    "n_layers",
    "hidden_size",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "intermediate_size",
    "norm_type",
    "activation",
    "positional",
    "vocab_size",
    "tied_embeddings",
    "block_linears",
)


def signature(desc: dict[str, Any]) -> str:
    """Short hash of the architecture fields a transplant depends on."""
    payload = json.dumps({k: desc.get(k) for k in SIGNATURE_FIELDS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def block_internal_signature(desc: dict[str, Any]) -> str:
    """Hash of what one block looks like from the inside, ignoring the hidden size."""
    keys = (
        "family",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "intermediate_size",
        "norm_type",
        "activation",
        "positional",
    )
    return hashlib.sha256(json.dumps({k: desc.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()[
        :16
    ]


def _first(config: Any, *names: str) -> Optional[Any]:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return None


def linear_weight_out_in(mod: nn.Module) -> torch.Tensor:
    """The module's weight as ``(out, in)`` regardless of Conv1D storage (a view, no copy)."""
    w = mod.weight
    return w.t() if _is_conv1d(mod) else w
