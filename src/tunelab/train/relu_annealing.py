"""Anneal SiLU into ReLU over a run (``method.activation.anneal``): a callback that sets β of every
``AnnealedReLU`` (``methods.activation``) before each optimizer step.

It lives with the training code, not with the method: a trained run reloads with plain ReLU and
never needs it (loading a run imports no training code).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunelab.methods.activation import AnnealedReLU
from tunelab.train.callbacks import Callback, TrainState, register_callback


class ReLUAnnealing(Callback):
    """Sets β of every ``AnnealedReLU`` before each optimizer step: ``anneal_beta ** (step / span)``
    over the first ``span`` steps, then exact ReLU. A function of the step alone, so a resumed run
    continues on the same schedule."""

    def __init__(self, fraction: float, final_beta: float):
        self.fraction, self.final_beta = fraction, final_beta

    def beta(self, step: int, total: int) -> float:
        span = max(1, min(round(self.fraction * total), total - 1))  # the last step always trains the exact ReLU it saves
        return float("inf") if step >= span else self.final_beta ** (step / span)

    def on_step_start(self, state: TrainState, batches: list[dict[str, torch.Tensor]]) -> None:
        self._set(state.model, self.beta(state.step, state.max_steps))

    def on_train_end(self, state: TrainState) -> None:
        self._set(state.model, float("inf"))  # what the config's hidden_act says the model computes

    @staticmethod
    def _set(model: nn.Module, beta: float) -> None:
        for module in model.modules():
            if isinstance(module, AnnealedReLU):
                module.beta = beta


@register_callback("relu_annealing")
def _relu_annealing(recipe: Any, cfg: object) -> Callback | None:
    chosen = getattr(recipe.method, "activation", None)
    return ReLUAnnealing(chosen.anneal, chosen.anneal_beta) if chosen is not None and chosen.anneal > 0 else None
