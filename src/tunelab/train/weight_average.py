"""Weight averaging as callbacks: stochastic weight averaging (SWA) and an exponential moving
average (EMA) of the trainable weights.

Both keep an fp32 average beside the live weights. The loop evaluates the average (and the live
weights, logged as ``eval_raw_*``), the run saves the average as ``final/`` and the live weights as
``final-raw/``, and checkpoints hold the live weights (what the optimizer continues from) plus the
average and its count in the callback state, so a resumed run averages bit-exactly the same.

Transformers here use LayerNorm/RMSNorm, which have no running statistics, so an average needs no
extra pass over the data; a model with BatchNorm gets a warning that its statistics belong to the
live weights (SWA's ``update_bn`` pass is what such models would need).
"""

from __future__ import annotations

import contextlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from tunelab.config_base import Section
from tunelab.errors import UserError
from tunelab.train.callbacks import Callback, TrainState, register_callback
from tunelab.train.checkpoint import trainable_parameters


@contextlib.contextmanager
def swapped_in(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """``weights`` in place of the model's parameters of the same names for the block, then the
    originals back (copied in and out, so optimizer references to the parameters stay valid)."""
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in weights}
    try:
        load_into(model, weights)
        yield
    finally:
        load_into(model, saved)


@torch.no_grad()
def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the model's parameters of the same names (in their dtype)."""
    params = dict(model.named_parameters())
    for name, value in weights.items():
        params[name].copy_(value.to(params[name].dtype))


class WeightAverage(Callback, ABC):
    """A running average of the trainable weights, updated after the steps ``due`` selects."""

    reads_weights = True

    def __init__(self, cfg: SWAConfig | EMAConfig) -> None:
        self.cfg = cfg
        self.average: dict[str, torch.Tensor] = {}
        self.count = 0

    @abstractmethod
    def first_step(self, total: int) -> int:
        """The step after which averaging begins (the weights after later steps enter it)."""

    @abstractmethod
    def blend(self, count: int) -> float:
        """The weight of the new weights when ``count`` snapshots are already averaged."""

    def due(self, step: int, total: int) -> bool:
        """Whether the weights after optimizer step ``step`` (1-based) enter the average."""
        start = self.first_step(total)
        return step > start and (step - start) % self.cfg.every == 0

    def on_train_start(self, state: TrainState) -> None:
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in state.model.modules()):
            warnings.warn(
                f"{self.name}: the model has BatchNorm layers; their running statistics belong to the live weights, "
                "not the average (recompute them with a pass over the training data before trusting the averaged model)",
                stacklevel=2,
            )

    @torch.no_grad()
    def on_step_end(self, state: TrainState) -> None:
        if not self.due(state.step, state.max_steps):
            return
        live = trainable_parameters(state.model)
        if not self.average:
            self.average = {name: p.detach().float().clone() for name, p in live.items()}
        else:
            weight = self.blend(self.count)
            for name, p in live.items():
                self.average[name].lerp_(p.detach().float(), weight)
        self.count += 1

    def averaged_weights(self) -> dict[str, torch.Tensor] | None:
        return self.average or None

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average, self.count = state["average"], state["count"]


def start_step(start: float, total: int) -> int:
    """A start given as a step (>= 1) or a fraction of the run (< 1), as a step count."""
    return int(start) if start >= 1 else round(start * total)


class SWAConfig(Section):
    """Stochastic weight averaging (Izmailov et al., 2018): an equal-weight average of the weights
    visited after ``start``, sampled every ``every`` steps, usually under a constant or cyclic LR."""

    start: float = Field(0.75, ge=0, description="First averaged step: a step number (>= 1) or a fraction of the run (< 1).")
    every: int = Field(1, ge=1, description="Steps between snapshots (the cycle length with schedule: cyclic).")
    lr: float | None = Field(None, gt=0, description="SWA learning rate from `start` on (constant, or the low end of a cycle); null keeps the recipe's schedule.")
    schedule: Literal["constant", "cyclic"] = Field("constant", description="cyclic: each cycle of `every` steps goes linearly from max_lr down to lr; the snapshot is taken at its end.")
    max_lr: float | None = Field(None, gt=0, description="The high end of a cyclic schedule; default: train.lr.")
    anneal_steps: int = Field(0, ge=0, description="Constant schedule: steps to move linearly from the scheduled LR to `lr` (torch's SWALR anneal).")

    @model_validator(mode="after")
    def _check(self) -> SWAConfig:
        if self.schedule == "cyclic" and self.lr is None:
            raise ValueError("schedule: cyclic needs lr (the low end of each cycle)")
        return self


class StochasticWeightAveraging(WeightAverage):
    """SWA: equal weights for every snapshot; optionally takes over the LR from ``start`` on."""

    name = "swa"  # type: ignore[assignment]

    def __init__(self, cfg: SWAConfig, base_lr: float):
        super().__init__(cfg)
        self.cfg: SWAConfig = cfg
        self.base_lr = base_lr

    def first_step(self, total: int) -> int:
        start = start_step(self.cfg.start, total)
        if start >= total:
            raise UserError(f"swa starts at step {start} but the run has {total} steps", where="callbacks", hint="lower start (a fraction < 1 is a share of the run)")
        return start

    def blend(self, count: int) -> float:
        return 1.0 / (count + 1)

    def lr_multiplier(self, step: int, total: int, scheduled: float) -> float:
        """From ``start`` on, the SWA learning rate (as a multiple of train.lr) replaces the schedule."""
        start = self.first_step(total)
        if self.cfg.lr is None or step < start:
            return scheduled
        low = self.cfg.lr / self.base_lr
        if self.cfg.schedule == "cyclic":
            high = (self.cfg.max_lr or self.base_lr) / self.base_lr
            t = ((step - start) % self.cfg.every + 1) / self.cfg.every
            return (1 - t) * high + t * low
        if self.cfg.anneal_steps and step - start < self.cfg.anneal_steps:
            t = (step - start + 1) / self.cfg.anneal_steps
            return (1 - t) * scheduled + t * low
        return low


class EMAConfig(Section):
    """An exponential moving average of the trainable weights (Polyak averaging with decay)."""

    decay: float = Field(0.999, ge=0, lt=1, description="Weight of the old average at each update.")
    warmup: bool = Field(True, description="Use min(decay, (1 + n) / (10 + n)) at the n-th update, so early weights fade fast.")
    start: float = Field(0, ge=0, description="First step averaged: a step number (>= 1) or a fraction of the run (< 1).")
    every: int = Field(1, ge=1, description="Steps between updates.")


class ExponentialMovingAverage(WeightAverage):
    """EMA: ``average = decay * average + (1 - decay) * weights`` after every ``every`` steps."""

    name = "ema"  # type: ignore[assignment]

    def __init__(self, cfg: EMAConfig):
        super().__init__(cfg)
        self.cfg: EMAConfig = cfg

    def first_step(self, total: int) -> int:
        return start_step(self.cfg.start, total)

    def blend(self, count: int) -> float:
        decay = min(self.cfg.decay, (1 + count) / (10 + count)) if self.cfg.warmup else self.cfg.decay
        return 1.0 - decay


@register_callback("swa", SWAConfig)
def _swa(recipe: Any, cfg: object) -> Callback | None:
    return StochasticWeightAveraging(cfg, recipe.train.lr) if isinstance(cfg, SWAConfig) else None


@register_callback("ema", EMAConfig)
def _ema(recipe: Any, cfg: object) -> Callback | None:
    return ExponentialMovingAverage(cfg) if isinstance(cfg, EMAConfig) else None


__all__ = ["EMAConfig", "ExponentialMovingAverage", "SWAConfig", "StochasticWeightAveraging", "WeightAverage", "load_into", "swapped_in"]
