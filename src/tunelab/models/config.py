"""The ``model:`` section of a recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunelab.config_base import Section


class ModelConfig(Section):
    """Which model to start from.

    ``name`` is a packaged alias (``tunelab models`` lists them), a local Hugging Face model
    directory, a ``.gguf`` file, or a tunelab run directory (its saved model is used).

    There is no ``kind`` key: whether a model is a decoder or an encoder is a fact of its
    architecture (``tunelab.models.load.model_kind`` reads it from the config), and declaring
    otherwise cannot change how its attention works. The choices it would steer have their own
    keys (``method.head.pooling``) or follow from the method (a head, or causal-LM training).
    """

    name: str = Field("smollm2-135m", description="Alias, HF model directory, .gguf file or run directory.")
    tokenizer: str | None = Field(None, description="Tokenizer directory when it differs from the model's.")
    attn_implementation: Literal["sdpa", "eager"] | None = Field(
        None, description="Attention kernel; None lets transformers choose."
    )
