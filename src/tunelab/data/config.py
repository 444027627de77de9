"""The ``data:`` section of a recipe: where the examples come from and how they become tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunelab.config_base import Section
from tunelab.data.augment import AugmentConfig

DataFormat = Literal[
    "auto", "chat", "prompt_completion", "instruction", "text", "classification", "multi_label", "pairs", "rerank", "tagged", "choices",
    "preference", "openai_preference",
]
TemplateName = Literal["auto", "model", "chatml", "llama3", "alpaca", "plain"]


class MixtureSource(Section):
    """One file of a training mixture, with the settings that turn its rows into examples."""

    train: str = Field(..., description="A JSONL/JSON/CSV/Parquet file or a folder of shards.")
    task: str | None = Field(None, description="The task its rows belong to (each example's task name); default: the file's name without extension.")
    format: DataFormat | None = Field(None, description="Its row format; default: data.format.")
    columns: dict[str, str] | None = Field(None, description="Rename its fields: {their_name: our_name}; default: data.columns.")
    prompt_template: str | None = Field(None, description="Builds the user turn from its row fields; default: data.prompt_template.")
    completion_template: str | None = Field(None, description="Builds the answer from its row fields; default: data.completion_template.")
    max_rows: int | None = Field(None, gt=0, description="Use at most this many of its rows (a seeded sample): caps a large source's share.")

    def task_name(self) -> str:
        return self.task or Path(self.train).name.split(".")[0]


class DataConfig(Section):
    """Training/validation data, its format, templating, tokenization and packing."""

    train: str | None = Field(None, description="A JSONL/JSON/CSV/Parquet file or a folder of shards.")
    mixture: list[MixtureSource] | None = Field(
        None, description="Train on several files instead of data.train, each with its own format and templates; every example carries its source's task name."
    )
    validation: str | None = Field(None, description="A separate validation file; else val_fraction is held out.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of train held out when no validation file.")
    format: DataFormat = Field("auto", description="Row format; auto detects it from the fields of the first row.")
    columns: dict[str, str] = Field(default_factory=dict, description="Rename fields: {their_name: our_name}.")
    template: TemplateName = Field(
        "auto",
        description="Chat template: auto = the model's own, else chatml; model = the model's own (required); "
        "or a named fallback.",
    )
    prompt_template: str | None = Field(
        None, description="Builds the user turn from row fields, e.g. 'Review: {text}\\nPositive or negative?'."
    )
    completion_template: str | None = Field(
        None, description="Builds the assistant answer from row fields, e.g. '{label}' (rows without a completion)."
    )
    system_prompt: str | None = Field(None, description="System message for rows that do not carry their own.")
    few_shot: int = Field(0, ge=0, description="Prepend this many solved training examples (seeded) as earlier turns.")
    labels: list[str | int] | None = Field(
        None, description="Classification label names in class-id order; default: sorted labels of the train split."
    )
    weight_column: str | None = Field(
        None, description="A numeric column that weights each example's loss (every task, chat SFT included; default 1)."
    )
    difficulty_column: str | None = Field(None, description="A numeric column carried on each example as its difficulty (curriculum samplers).")
    language_column: str | None = Field(None, description="A string column carried on each example as its language (samplers, reports).")
    task_column: str | None = Field(None, description="A string column naming each example's task (meta-learning draws its episodes from one task each).")
    max_length: int = Field(
        512, gt=0, description="Longer examples are truncated; dropped if no supervised token is left."
    )
    truncation_side: Literal["left", "right"] = Field("right", description="Which end of a long example is cut.")
    train_on_prompt: bool = Field(False, description="Supervise prompt tokens too (default: only assistant turns).")
    dedup: bool = Field(True, description="Remove exact duplicate rows (and train rows repeated in validation).")
    packing: bool = True
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="error: stop at a bad row; skip: count and go on."
    )

    augment: AugmentConfig | None = Field(None, description="Augmented copies of the training rows (EDA, masking); validation and test rows are never touched.")

    @model_validator(mode="after")
    def _one_training_source(self) -> DataConfig:
        if self.mixture is not None:
            if self.train:
                raise ValueError("set data.train or data.mixture, not both")
            if not self.mixture:
                raise ValueError("data.mixture lists no file")
            names = [source.task_name() for source in self.mixture]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"two mixture sources are task {repeated[0]!r}: name each with its own task")
        return self

    @model_validator(mode="before")
    @classmethod
    def _order_is_the_samplers(cls, data: object) -> object:
        if isinstance(data, dict) and "curriculum" in data:
            raise ValueError("the order examples come in is the sampler's: write sampler: {name: curriculum, ...} (or self_paced, importance) at the top level")
        return data
