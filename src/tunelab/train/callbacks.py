"""Callbacks act on the training loop's events without changing the loop.

Built in: early stopping. Other packages register theirs (gradual pruning, EMA, curriculum
pacing, QAT toggles) with ``register_callback``: a factory receives the recipe and returns a
callback, or None when the recipe does not ask for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from tunelab.recipe import Recipe
    from tunelab.train.config import EarlyStoppingConfig


@dataclass
class TrainState:
    """What callbacks may read (and, for ``should_stop``, write)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    run_dir: Path
    max_steps: int
    step: int = 0
    epoch: int = 0
    should_stop: bool = False
    stop_reason: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class Callback:
    """Override the events you need; every hook is a no-op by default."""

    def on_train_start(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState) -> None:
        """After each optimizer step (weights already updated)."""

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...


class EarlyStopping(Callback):
    """Stop after ``patience`` evaluations without an improvement larger than ``min_delta``."""

    def __init__(self, cfg: "EarlyStoppingConfig"):
        self.cfg = cfg
        self.best: float | None = None
        self.bad_evals = 0

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        if self.cfg.metric not in metrics:
            raise KeyError(f"train.early_stopping.metric {self.cfg.metric!r} is not logged; logged: {sorted(metrics)}")
        value = metrics[self.cfg.metric]
        sign = 1 if self.cfg.mode == "min" else -1
        if self.best is None or sign * (self.best - value) > self.cfg.min_delta:
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.cfg.patience:
            state.should_stop = True
            state.stop_reason = f"early stopping: {self.cfg.metric} did not improve for {self.bad_evals} evaluations"


CallbackFactory = Callable[["Recipe"], Callback | None]
CALLBACK_FACTORIES: dict[str, CallbackFactory] = {}


def register_callback(name: str) -> Callable[[CallbackFactory], CallbackFactory]:
    def wrap(factory: CallbackFactory) -> CallbackFactory:
        CALLBACK_FACTORIES[name] = factory
        return factory

    return wrap


@register_callback("early_stopping")
def _early_stopping(recipe: "Recipe") -> Callback | None:
    return EarlyStopping(recipe.train.early_stopping) if recipe.train.early_stopping else None


def callbacks_for(recipe: "Recipe") -> list[Callback]:
    """Every registered callback the recipe asks for."""
    return [cb for factory in CALLBACK_FACTORIES.values() if (cb := factory(recipe)) is not None]
