"""Lottery-ticket pieces: iterative magnitude pruning with rewinding (Frankle et al. 2019, 2020).

Each round prunes ``rate`` of the weights still alive (so after ``k`` rounds ``1 - (1-rate)^k``
are gone), then resets the survivors to their values at an early ``rewind`` step and trains
again. Rewinding to an early checkpoint rather than to initialization is what makes tickets
appear in large networks ("Stabilizing the Lottery Ticket Hypothesis").
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def sparsity_after(rounds: int, rate: float) -> float:
    """Fraction pruned after ``rounds`` rounds of pruning ``rate`` of the survivors."""
    return 1 - (1 - rate) ** rounds


def snapshot(layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """A copy of the layers' weights: the rewind point."""
    return {name: layer.weight.detach().clone() for name, layer in layers.items()}


@torch.no_grad()
def rewind(layers: Mapping[str, nn.Module], saved: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Reset every surviving weight to its saved value; pruned weights stay zero."""
    for name, layer in layers.items():
        layer.weight.copy_(saved[name] * masks[name].to(saved[name].dtype))
