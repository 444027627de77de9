"""The ``train:`` section: the optimisation loop's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunelab.config_base import Section


class TrainConfig(Section):
    """Optimizer, schedule, batch shape, precision and bookkeeping of one training run."""

    lr: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(4, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
