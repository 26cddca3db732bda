"""Tiny random models with fixed seeds, for tests and instant demos.

Each tiny model comes with its own small byte-level BPE tokenizer trained on a fixed built-in
corpus, so no download is ever needed. The GPT-2 pair and the Llama pair use different
tokenizers, which exercises Graft's cross-tokenizer (word-level) alignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A model is a function from tokens to probabilities over the next token.",
    "Transformers stack attention and feed-forward blocks on a residual stream.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The river flows north through the valley and into the cold sea.",
    "Numbers such as 1, 2, 3, 10, 42 and 1000 appear in many texts.",
    "Questions end with a question mark? Answers often do not.",
    "She said that the library opens at nine in the morning on weekdays.",
    "In the year 1969 people walked on the moon for the first time.",
    "Cats and dogs are common pets; parrots can learn to speak words.",
    "Light travels faster than sound, which is why we see lightning first.",
    "The orchestra played a symphony in four movements last night.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "Mountains, rivers, forests and deserts shape where people live.",
]

SPECIAL = "<|endoftext|>"


def _train_tokenizer(vocab_size: int, corpus_order: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the fixed corpus; deterministic for a given (vocab_size, order)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _CORPUS if corpus_order == 0 else list(reversed(_CORPUS)) * 2
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        unk_token=SPECIAL,
        pad_token=SPECIAL,
    )
    fast.model_max_length = 256
    return fast


@dataclass(frozen=True)
class TinySpec:
    name: str
    description: str
    make_config: Callable[[int], PreTrainedConfig]
    seed: int
    tokenizer_vocab: int
    tokenizer_order: int


def _gpt2_config(vocab: int) -> GPT2Config:
    return GPT2Config(
        n_layer=4,
        n_embd=64,
        n_head=4,
        n_positions=256,
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def _llama_config(vocab: int) -> LlamaConfig:
    return LlamaConfig(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=vocab,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


TINY_MODELS: dict[str, TinySpec] = {
    "tiny-gpt2-a": TinySpec(
        "tiny-gpt2-a", "GPT-2, 4 layers, width 64, random (seed 0)", _gpt2_config, 0, 512, 0
    ),
    "tiny-gpt2-b": TinySpec(
        "tiny-gpt2-b", "GPT-2, 4 layers, width 64, random (seed 1)", _gpt2_config, 1, 512, 0
    ),
    "tiny-llama-a": TinySpec(
        "tiny-llama-a", "Llama, 4 layers, width 64, GQA, random (seed 2)", _llama_config, 2, 384, 1
    ),
    "tiny-llama-b": TinySpec(
        "tiny-llama-b", "Llama, 4 layers, width 64, GQA, random (seed 3)", _llama_config, 3, 384, 1
    ),
}


def build_tiny(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build a tiny random model and its tokenizer in-process (milliseconds)."""
    spec = TINY_MODELS[name]
    tokenizer = _train_tokenizer(spec.tokenizer_vocab, spec.tokenizer_order)
    config = spec.make_config(len(tokenizer))
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model, tokenizer
