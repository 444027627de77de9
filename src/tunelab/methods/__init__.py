"""Methods: what is trained. Each is a registered plug-in (``tunelab.methods.base``); they compose.

``apply_methods`` runs the methods a recipe's ``method:`` section switches on, in their declared
order (built-ins: dropout, freeze, a peft adapter family, bottleneck adapters, a task head, the
trained parts of a vision-language model, hierarchical family adapters, then how the added parameters start).
Importing this package registers the built-in methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunelab.methods import (  # noqa: F401  (registration)
    activation,
    bottleneck,
    dropout,
    freeze,
    heads,
    hierarchy,
    initialise,
    peft_adapters,
    student,
    vision,
)
from tunelab.methods.base import (
    METHODS,
    Method,
    MethodContext,
    active_methods,
    register_method,
)
from tunelab.methods.config import MethodConfig


@dataclass(frozen=True)
class TrainableSummary:
    """How much of the model trains (printed at start and kept in the run summary)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} / {self.total:,} ({self.percent:.3f}%)"


def apply_methods(
    model: torch.nn.Module, section: MethodConfig, *, model_task: str, tokenizer_dir: str | None = None, tokenizer: Any = None
) -> torch.nn.Module:
    """Prepare ``model`` for training as the recipe's ``method:`` section says."""
    ctx = MethodContext(model_task=model_task, tokenizer_dir=tokenizer_dir, tokenizer=tokenizer)
    for method, cfg in active_methods(section):
        model = method.apply(model, cfg, ctx)
    return model


def trainable_summary(model: torch.nn.Module) -> TrainableSummary:
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return TrainableSummary(trainable, total)


__all__ = ["METHODS", "Method", "MethodConfig", "MethodContext", "TrainableSummary", "active_methods", "apply_methods", "register_method", "trainable_summary"]
