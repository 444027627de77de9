"""The ``data:`` section of a recipe: where the examples come from and how they become tokens."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunelab.config_base import Section

DataFormat = Literal["auto", "chat", "prompt_completion", "instruction", "text", "classification"]


class DataConfig(Section):
    """Training/validation data, its format, templating, tokenization and packing."""

    train: str | None = Field(None, description="A JSONL/JSON/CSV/Parquet file or a folder of shards.")
    validation: str | None = Field(None, description="A separate validation file; else val_fraction is held out.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of train held out when no validation file.")
    format: DataFormat = "auto"
    columns: dict[str, str] = Field(default_factory=dict, description="Rename fields: {their_name: our_name}.")
    max_length: int = Field(512, gt=0)
    train_on_prompt: bool = False
    packing: bool = True
    on_bad_row: Literal["error", "skip"] = "error"
