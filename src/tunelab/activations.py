"""Activation layers tunelab puts into models: the floored ReLU of ``method.activation.floor``.

A module of its own, importing nothing of tunelab's packages, because two sides need the layer:
the method that installs and trains it (``tunelab.methods.activation``, which says why floors)
and the compressed-model store that saves and rebuilds it (``tunelab.compress.store``, imported
while ``tunelab.models`` itself loads, before the methods package can be).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import UserError


class FlooredReLU(nn.Module):
    """``x`` where ``x > 0``, else the channel's ``floor``. The floors start as NaN and the first
    forward sets them from its own input: each channel's mean of ``silu(x)`` over its ``x ≤ 0``
    (0 for a channel that never closes there), the constant closest in squared error to what the
    SiLU model put there. A loaded or resumed model has its floors already and keeps them."""

    FLOORS_FILE = "activation_floors.safetensors"

    def __init__(self, channels: int):
        super().__init__()
        self.floor = nn.Parameter(torch.full((channels,), float("nan")))
        self._calibrated = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._calibrated:
            if torch.isnan(self.floor).any():
                self.calibrate(x)
            self._calibrated = True
        return torch.where(x > 0, x, self.floor.to(x.dtype))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Set the floors from gate values ``x`` (any leading shape)."""
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise UserError("method.activation.floor calibrates on one process's first batch; data-parallel processes would disagree",
                            where="method.activation.floor", hint="calibrate in a single-process run first, then train that run in parallel")
        gates = x.detach().reshape(-1, x.shape[-1]).float()
        closed = gates <= 0
        counts = closed.sum(0)
        means = (F.silu(gates) * closed).sum(0) / counts.clamp(min=1)
        self.floor.copy_(torch.where(counts > 0, means, torch.zeros_like(means)).to(self.floor.dtype))

    def extra_repr(self) -> str:
        return f"channels={self.floor.numel()}"
