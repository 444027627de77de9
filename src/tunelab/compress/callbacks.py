"""Compression during fine-tuning: gradual pruning, lottery tickets and QAT as training callbacks.

Each callback is registered with the trainer's callback registry and switched on by the
recipe's ``compress.gradual``, ``compress.lottery`` or ``compress.qat``. Masks live in the
callback, are re-applied after every optimizer step, and are already folded into the weights
when the run saves its model; each callback writes what it did into the run directory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from tunelab import atomic
from tunelab.compress import lottery
from tunelab.compress.masks import apply_masks, sparsity_of
from tunelab.compress.prune import select
from tunelab.compress.qat import prepare_qat, unwrap_qat
from tunelab.compress.qlinear import QuantSpec
from tunelab.compress.schedule import cubic_sparsity
from tunelab.compress.targets import linear_layers
from tunelab.config_base import Section
from tunelab.errors import UserError
from tunelab.train.callbacks import Callback, TrainState, register_callback

if TYPE_CHECKING:
    from tunelab.compress.config import GradualPruning, LotteryTicket, QuantizationAwareTraining
    from tunelab.recipe import Recipe


def _magnitudes(layers: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {name: layer.weight.detach().abs().float() for name, layer in layers.items()}


class GradualPruningCallback(Callback):
    """Raise sparsity on the cubic schedule, recomputing magnitude masks every ``every`` steps."""

    reads_weights = True

    def __init__(self, cfg: GradualPruning):
        self.cfg = cfg
        self.layers: dict[str, torch.nn.Module] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, Any]] = []

    def on_train_start(self, state: TrainState) -> None:
        self.layers = linear_layers(state.model, self.cfg.targets)
        self.end = self.cfg.end_step or state.max_steps
        cubic_sparsity(0, initial=self.cfg.initial_sparsity, final=self.cfg.sparsity, start=self.cfg.start_step, end=self.end)

    def on_step_end(self, state: TrainState) -> None:
        step = state.step
        due = self.cfg.start_step <= step <= self.end and ((step - self.cfg.start_step) % self.cfg.every == 0 or step == self.end)
        if due:
            target = cubic_sparsity(step, initial=self.cfg.initial_sparsity, final=self.cfg.sparsity, start=self.cfg.start_step, end=self.end)
            self.masks = select(_magnitudes(self.layers), target, scope=self.cfg.scope)
            self.history.append({"step": step, "target_sparsity": target})
        if self.masks:
            apply_masks(self.layers, self.masks)

    def on_train_end(self, state: TrainState) -> None:
        measured = sparsity_of({n: layer.weight.detach() for n, layer in self.layers.items()})
        atomic.write_json(state.run_dir / "gradual_pruning.json", {"measured_sparsity": measured, "schedule": self.history})

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the masks and apply them now: frozen base weights are not in the checkpoint."""
        self.masks, self.history = state["masks"], state["history"]
        if self.masks:
            apply_masks(self.layers, self.masks)


class LotteryTicketCallback(Callback):
    """Prune ``rate`` of the survivors at the end of each of ``rounds`` equal segments, rewind, go on."""

    reads_weights = True

    def __init__(self, cfg: LotteryTicket):
        self.cfg = cfg
        self.layers: dict[str, torch.nn.Module] = {}
        self.saved: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, Any]] = []

    def on_train_start(self, state: TrainState) -> None:
        self.layers = linear_layers(state.model, self.cfg.targets)
        self.segment = state.max_steps // (self.cfg.rounds + 1)
        if self.cfg.rewind_step >= self.segment:
            raise UserError(
                f"lottery rewind_step {self.cfg.rewind_step} must come before the first pruning at step {self.segment}",
                where="compress.lottery", hint="train longer or rewind earlier",
            )
        if self.cfg.rewind_step == 0:
            self.saved = lottery.snapshot(self.layers)

    def on_step_end(self, state: TrainState) -> None:
        if state.step == self.cfg.rewind_step:
            self.saved = lottery.snapshot(self.layers)
        finished_round = state.step // self.segment if state.step % self.segment == 0 else 0
        if 1 <= finished_round <= self.cfg.rounds:
            target = lottery.sparsity_after(finished_round, self.cfg.rate)
            self.masks = select(_magnitudes(self.layers), target, scope="layer")
            lottery.rewind(self.layers, self.saved, self.masks)
            state.optimizer.state.clear()  # each round retrains from the rewind point with fresh moments
            self.history.append({"step": state.step, "round": finished_round, "sparsity": target})
        elif self.masks:
            apply_masks(self.layers, self.masks)

    def on_train_end(self, state: TrainState) -> None:
        measured = sparsity_of({n: layer.weight.detach() for n, layer in self.layers.items()})
        atomic.write_json(state.run_dir / "lottery_ticket.json", {"measured_sparsity": measured, "rounds": self.history})

    def state_dict(self) -> dict[str, Any]:
        """The rewind point and the current masks: a resumed run rewinds to the same weights."""
        return {"saved": self.saved, "masks": self.masks, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore and apply the masks now: frozen base weights are not in the checkpoint."""
        self.saved, self.masks, self.history = state["saved"], state["masks"], state["history"]
        if self.masks:
            apply_masks(self.layers, self.masks)


class QuantizationAwareCallback(Callback):
    """Fake-quantize the target layers for the whole run; unwrap at the end so the run saves plain weights.

    The layers are wrapped in ``on_train_start``, which the trainer calls before it loads a
    checkpoint, so a resumed QAT run finds the ``...linear.weight`` names its checkpoint holds."""

    reads_weights = True

    def __init__(self, cfg: QuantizationAwareTraining):
        self.cfg = cfg
        self.spec = QuantSpec(cfg.quantize, cfg.group_size, cfg.bits)

    def on_train_start(self, state: TrainState) -> None:
        self.names = prepare_qat(state.model, self.spec, self.cfg.targets)

    def on_train_end(self, state: TrainState) -> None:
        unwrap_qat(state.model)
        atomic.write_json(state.run_dir / "qat.json", {
            "spec": self.cfg.model_dump(), "layers": self.names,
            "convert": "tunelab compress RUN_DIR with a variant `quantize: <same format, group_size, bits, targets>`",
        })


class KeepSparsity(Section):
    """Keep a pruned model's zeros at zero while it trains: recovery fine-tuning or distillation of a
    model from ``tunelab compress`` (with ``keep_models: true``) keeps the sparsity it was pruned to."""

    targets: list[str] = Field(default_factory=list, description="Regexes of linear layer names; empty: all but the output head and adapters.")


class KeepSparsityCallback(Callback):
    """Masks from the weights that are exactly zero when training starts, re-applied after every step."""

    reads_weights = True

    def __init__(self, cfg: KeepSparsity):
        self.cfg = cfg
        self.layers: dict[str, torch.nn.Module] = {}
        self.masks: dict[str, torch.Tensor] = {}

    def on_train_start(self, state: TrainState) -> None:
        self.layers = linear_layers(state.model, self.cfg.targets)
        self.masks = {name: layer.weight.detach() != 0 for name, layer in self.layers.items() if bool((layer.weight == 0).any())}
        if not self.masks:
            raise UserError("keep_sparsity found no pruned weights (no exact zeros) in the model's linear layers", where="callbacks",
                            hint="train a model written by tunelab compress with a prune step, or remove keep_sparsity")

    def on_step_end(self, state: TrainState) -> None:
        apply_masks(self.layers, self.masks)

    def on_train_end(self, state: TrainState) -> None:
        measured = sparsity_of({n: self.layers[n].weight.detach() for n in self.masks})
        atomic.write_json(state.run_dir / "keep_sparsity.json", {"measured_sparsity_of_pruned_layers": measured, "layers": len(self.masks)})

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = state["masks"]


@register_callback("keep_sparsity", KeepSparsity)
def _keep_sparsity(recipe: Recipe, cfg: object) -> Callback | None:
    return KeepSparsityCallback(cfg) if isinstance(cfg, KeepSparsity) else None


@register_callback("gradual_pruning")
def _gradual(recipe: Recipe, cfg: object) -> Callback | None:
    return GradualPruningCallback(recipe.compress.gradual) if recipe.compress.gradual else None


@register_callback("lottery_ticket")
def _lottery(recipe: Recipe, cfg: object) -> Callback | None:
    return LotteryTicketCallback(recipe.compress.lottery) if recipe.compress.lottery else None


@register_callback("qat")
def _qat(recipe: Recipe, cfg: object) -> Callback | None:
    return QuantizationAwareCallback(recipe.compress.qat) if recipe.compress.qat else None
