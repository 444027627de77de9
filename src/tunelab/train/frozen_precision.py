"""Store frozen weights in the autocast dtype while training.

Under bf16 autocast every matmul reads its weight in bf16 anyway, but a frozen fp32 weight is not
in autocast's cast cache (it caches only leaves that require grad), so it is converted again on
every forward, and the activations between layers stay fp32, so each adapted linear layer casts
its input again for the base weight and for each adapter. Holding the frozen weights in bf16
removes those conversions, halves the elementwise traffic of the residual stream, norms, RoPE and
MLP gates, and halves the frozen weights' memory. Matmul numerics are unchanged (the same bf16
operands); what changes is that the residual stream is rounded to bf16 between layers, which the
benchmark's loss-parity check covers. Trainable weights (adapters, heads, unfrozen blocks) stay
fp32, so the optimizer updates full-precision masters.
"""

from __future__ import annotations

import torch


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> dict[torch.nn.Parameter, torch.dtype]:
    """Convert every frozen floating-point parameter to ``dtype``; returns what to ``restore``."""
    original: dict[torch.nn.Parameter, torch.dtype] = {}
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            original[param] = param.dtype
            param.data = param.data.to(dtype)
    return original


def restore(original: dict[torch.nn.Parameter, torch.dtype]) -> None:
    """Give the frozen weights their dtype back (values keep the rounding they trained with)."""
    for param, dtype in original.items():
        param.data = param.data.to(dtype)
