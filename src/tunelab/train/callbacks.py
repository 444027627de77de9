"""Callbacks act on the training loop's events without changing the loop.

Events, in order: ``on_train_start`` (once; a resumed run's checkpoint is loaded *after* it, so a
callback that re-wraps modules, like QAT, sees its own layers restored), then per optimizer step
``on_epoch_start`` (first step of an epoch), ``on_step_start`` (sees the step's micro-batches),
``on_after_backward`` (gradients are in ``.grad``, before clipping and the optimizer step),
``on_step_end`` (weights updated; ``state.loss`` and ``state.lr`` set), ``on_eval`` (after each
evaluation), ``on_epoch_end``; finally ``on_train_end``. ``state_dict``/``load_state_dict`` are
saved into and restored from every checkpoint, keyed by ``name``, so resume is exact. Two hooks
are not events: ``lr_multiplier`` may replace the schedule, and ``averaged_weights`` offers weights
the loop evaluates and the run saves in place of the live ones (SWA, EMA).

Built in: early stopping. Others register a factory with ``register_callback``: it receives the
recipe and, when the recipe lists the callback under ``callbacks:``, that entry's validated
config; it returns a callback, or None when the recipe does not ask for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from tunelab.config_base import Section
from tunelab.plugins import Registry

if TYPE_CHECKING:
    from tunelab.train.config import EarlyStoppingConfig

#: The validated recipe (``tunelab.recipe.Recipe``; not imported here: the recipe imports this registry).
RecipeLike = Any


@dataclass
class TrainState:
    """What callbacks may read (and, for ``should_stop``/``stop_reason``, write)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    run_dir: Path
    max_steps: int
    step: int = 0
    epoch: int = 0
    loss: float | None = None
    lr: float | None = None
    should_stop: bool = False
    stop_reason: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class Callback:
    """Override the events you need; every hook is a no-op by default."""

    #: True for a callback that reads or rewrites the weights themselves (pruning masks, QAT,
    #: weight averages): under ``strategy: fsdp`` it would see one shard, so the trainer refuses it.
    reads_weights: ClassVar[bool] = False

    @property
    def name(self) -> str:
        """The key of this callback's state in checkpoints (one instance per class by default)."""
        return type(self).__name__

    def on_train_start(self, state: TrainState) -> None: ...

    def on_epoch_start(self, state: TrainState) -> None: ...

    def on_step_start(self, state: TrainState, batches: list[dict[str, torch.Tensor]]) -> None:
        """Before the forward passes of one optimizer step; ``batches`` are its micro-batches."""

    def on_after_backward(self, state: TrainState) -> None:
        """Gradients of the whole step are accumulated (unclipped, unscaled under fp16)."""

    def on_step_end(self, state: TrainState) -> None:
        """After each optimizer step (weights already updated)."""

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None: ...

    def on_epoch_end(self, state: TrainState) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...

    def lr_multiplier(self, step: int, total: int, scheduled: float) -> float:
        """The LR multiplier for 0-based optimizer step ``step`` of ``total``, given the
        schedule's ``scheduled`` one (SWA takes the LR over; most callbacks leave it)."""
        return scheduled

    def averaged_weights(self) -> dict[str, torch.Tensor] | None:
        """Trainable weights by name to evaluate and save instead of the live ones (weight
        averaging), or None. The loop evaluates both; the run saves these as ``final/``."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What this callback must remember across a resume (tensors, numbers, lists)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals = state["best"], state["bad_evals"]


CallbackFactory = Callable[[RecipeLike, Any], Callback | None]


@dataclass(frozen=True)
class CallbackPlugin:
    """A registered callback: its factory and, for callbacks listed under ``callbacks:``, its config."""

    factory: CallbackFactory
    Config: type[Section] | None = None


CALLBACKS: Registry[CallbackPlugin] = Registry("callback", "callbacks")


def register_callback(name: str, Config: type[Section] | None = None) -> Callable[[CallbackFactory], CallbackFactory]:
    """Register ``factory(recipe, cfg)``; with ``Config``, recipes may list ``{name: <name>, ...}`` under ``callbacks:``."""

    def wrap(factory: CallbackFactory) -> CallbackFactory:
        CALLBACKS.register(name, CallbackPlugin(factory, Config))
        return factory

    return wrap


@register_callback("early_stopping")
def _early_stopping(recipe: RecipeLike, cfg: Any) -> Callback | None:
    return EarlyStopping(recipe.train.early_stopping) if recipe.train.early_stopping else None


def callbacks_for(recipe: RecipeLike) -> list[Callback]:
    """Every registered callback the recipe asks for: by its own section, or listed under ``callbacks:``."""
    listed = {entry.name: entry for entry in getattr(recipe, "callbacks", None) or []}
    made = [CALLBACKS.get(name).factory(recipe, listed.get(name)) for name in CALLBACKS]
    return [cb for cb in made if cb is not None]
