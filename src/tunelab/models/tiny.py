"""Tiny randomly initialised models and a byte-level tokenizer, built offline from a config.

Tests and benchmarks need real architectures (Llama, Qwen2, BERT, BLOOM) without downloading weights.
Each tiny alias builds the model from a small config with a fixed seed and pairs it with a
byte-level tokenizer (256 byte tokens + chat specials, ChatML template), so every text round-trips
exactly and no vocabulary file is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BertConfig,
    BloomConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "[CLS]", "[SEP]", "[MASK]"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer(encoder_style: bool = False) -> PreTrainedTokenizerFast:
    """A lossless byte-level tokenizer: ids 0-6 are specials, then one id per byte.

    ``encoder_style`` adds BERT-like ``[CLS] ... [SEP]`` framing so encoder heads see a CLS token.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    if encoder_style:
        from tokenizers import processors

        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if not encoder_style:
        tok.chat_template = CHATML_TEMPLATE
    return tok


BYTE_VOCAB = len(SPECIAL_TOKENS) + 256


@dataclass(frozen=True)
class TinySpec:
    """How to build one tiny model: its config and whether it is an encoder."""

    make_config: Callable[[], PretrainedConfig]
    encoder: bool
    description: str


def _llama(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, inter: int = 128) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=3,
        tie_word_embeddings=True,
    )


TINY_MODELS: dict[str, TinySpec] = {
    "tiny-llama": TinySpec(_llama, False, "Llama, hidden 64, 2 layers, GQA (random init)"),
    "tiny-llama-20m": TinySpec(
        lambda: _llama(hidden=512, layers=6, heads=8, kv_heads=4, inter=1408),
        False,
        "Llama, hidden 512, 6 layers, ~20M params (random init; benchmarks)",
    ),
    "tiny-qwen2": TinySpec(
        lambda: Qwen2Config(
            vocab_size=BYTE_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, use_sliding_window=True, sliding_window=16, max_window_layers=1,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, pad_token_id=3,
        ),
        False,
        "Qwen2, hidden 64, 2 layers, the second with 16-token sliding-window attention (random init)",
    ),
    "tiny-bert": TinySpec(
        lambda: BertConfig(
            vocab_size=BYTE_VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=512,
            pad_token_id=3,
        ),
        True,
        "BERT, hidden 64, 2 layers (random init)",
    ),
    "tiny-bloom": TinySpec(
        lambda: BloomConfig(
            vocab_size=BYTE_VOCAB, hidden_size=64, n_layer=2, n_head=4, pad_token_id=3, eos_token_id=0, bos_token_id=0
        ),
        False,
        "BLOOM, hidden 64, 2 layers (random init)",
    ),
}


def build_tiny(
    name: str, model_class: Any, seed: int = 0, attn_implementation: str | None = None, **config_overrides: Any
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Build tiny model ``name`` with ``model_class`` (an Auto* class) and its byte tokenizer.

    ``attn_implementation`` ("eager", "sdpa"; None lets transformers choose) is the attention
    kernel it is built with, as ``from_pretrained`` takes it for real models.
    """
    spec = TINY_MODELS[name]
    config = spec.make_config()
    for key, value in config_overrides.items():
        setattr(config, key, value)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class.from_config(config, attn_implementation=attn_implementation)
    model.config.name_or_path = name
    return model, byte_tokenizer(encoder_style=spec.encoder)
