"""The shape of a decoder, read from its configuration: all the planner needs, no weights.

Memory depends on a handful of numbers (width, depth, heads, key/value heads, MLP width,
vocabulary, whether the LM head shares the embedding) and on which layer kinds a block is made
of. The planner's activation rules (``layer_activations``) are derived for the Llama block:
RMSNorm, rotary attention with grouped key/value heads, a gated (SwiGLU) MLP, no biases. Model
families built from exactly that block are accepted; others are refused by name rather than
estimated with rules that do not describe them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.errors import UserError

#: ``config.model_type`` values whose decoder block is the Llama block the rules describe
#: (Qwen2 adds q/k/v biases, counted as parameters; their activations are the same).
LLAMA_BLOCK_FAMILIES = ("llama", "mistral", "qwen2")

#: The linear layers of one block, in the order the block runs them.
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    """A Llama-block decoder's dimensions."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = False

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shape(self, name: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of one of ``BLOCK_LINEARS``."""
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }[name]

    def block_linear_params(self) -> int:
        """Weights of one block's linear layers (what NF4 quantizes and tensor parallelism splits)."""
        weights = sum(a * b for a, b in map(self.linear_shape, BLOCK_LINEARS))
        return weights + self.bias_params()

    def bias_params(self) -> int:
        """Attention biases: q/k/v in Qwen2; q/k/v/o in a Llama with ``attention_bias``."""
        if not self.qkv_bias:
            return 0
        return self.q_width + 2 * self.kv_width + (self.hidden if self.model_type == "llama" else 0)

    def block_params(self) -> int:
        """One block: its linears and its two RMSNorm weights."""
        return self.block_linear_params() + 2 * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self) -> int:
        """The LM head's own weights: none when it is the embedding matrix (tied)."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def outside_params(self) -> int:
        """Everything outside the blocks: embedding, final norm, an untied head."""
        return self.embedding_params() + self.hidden + self.head_params()

    def total_params(self) -> int:
        return self.layers * self.block_params() + self.outside_params()


def architecture_from_config(config: Any, name: str) -> Architecture:
    """An ``Architecture`` from a transformers ``PretrainedConfig`` (or anything with its fields)."""
    model_type = str(getattr(config, "model_type", "") or "")
    if model_type not in LLAMA_BLOCK_FAMILIES:
        raise UserError(
            f"the planner models Llama-style decoders ({', '.join(LLAMA_BLOCK_FAMILIES)}); {name} is a {model_type or 'model of unknown type'}",
            where="--model", hint="plan a Llama-family model, or estimate this one by hand from docs/plan.md",
        )
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return Architecture(
        name=name,
        model_type=model_type,
        hidden=hidden,
        layers=int(config.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        intermediate=int(config.intermediate_size),
        vocab=int(config.vocab_size),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=bool(getattr(config, "attention_bias", False)) or model_type == "qwen2",
    )
