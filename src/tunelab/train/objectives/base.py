"""The objective protocol and its registry.

An objective says what the loss is. The trainer calls ``objective(model, batch)`` and gets back
the loss **summed** over the batch's supervision units (tokens, examples, pairs) plus statistics
to aggregate. Summing rather than averaging is what makes gradient accumulation and
data-parallel training exact: the trainer divides by the number of units in the whole optimizer
step across all micro-batches and processes (``units(batch)``), so a step means the same thing
however the batch is split.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

Stats = dict[str, Any]


class Objective(Protocol):
    """What the trainer needs from a loss."""

    name: str
    #: How batches must be built: "packed" (one row, position_ids restart) or "padded".
    collation: str

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many supervision units (the loss's denominator) this batch holds."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        """Summed loss over the batch's units and additive statistics (sums, or lists to concatenate)."""

    def summarize(self, stats: Stats) -> dict[str, float]:
        """Turn accumulated statistics into reportable metrics (loss, perplexity, accuracy, ...)."""

    # Optional: ``attention_scope(model, batch) -> ContextManager``. An objective that changes how
    # the model attends for a batch (packed rows: per-example attention) exposes it, and the
    # trainer holds it over forward *and* backward, because activation checkpointing re-runs the
    # forward inside backward and must attend the same way.


OBJECTIVES: dict[str, Callable[..., Objective]] = {}


def register(name: str) -> Callable[[Callable[..., Objective]], Callable[..., Objective]]:
    """Register an objective factory under ``name`` (``tunelab.methods.heads`` maps each head type to one)."""

    def wrap(factory: Callable[..., Objective]) -> Callable[..., Objective]:
        OBJECTIVES[name] = factory
        return factory

    return wrap


def accumulate(total: Stats, new: Stats) -> Stats:
    """Add numbers, concatenate lists/tensors: how per-batch statistics combine."""
    for key, value in new.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            total[key] = torch.cat([total[key], value.reshape(-1)]) if key in total else value.reshape(-1).clone()
        elif isinstance(value, list):
            total.setdefault(key, []).extend(value)
        else:
            total[key] = total.get(key, 0) + value
    return total
