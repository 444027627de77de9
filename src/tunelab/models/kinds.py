"""Which architecture family a model config describes (no weights, no model code imported)."""

from __future__ import annotations

from typing import Any


def model_kind(config: Any) -> str:
    """'encoder' for BERT-like configs, else 'causal-lm'."""
    return "causal-lm" if getattr(config, "is_decoder", False) or _is_causal(config) else "encoder"


def _is_causal(config: Any) -> bool:
    return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or [])) or getattr(
        config, "model_type", ""
    ) in {"llama", "bloom", "gpt2", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3"}
