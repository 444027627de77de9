"""Sign-based optimizers: every parameter moves by ±lr, whatever its gradient's size.

- ``SignMomentum``: Signum (Bernstein et al., 2018): ``m ← βm + (1-β)g``, ``p ← p - lr·(sign(m) + λp)``;
  with ``β = 0`` it is signSGD. One state tensor per parameter (none for signSGD).
- ``Lion`` (Chen et al., 2023): the sign of an interpolation between the momentum and the fresh
  gradient, ``p ← p - lr·(sign(β1·m + (1-β1)·g) + λp)``, then ``m ← β2·m + (1-β2)·g``. One state
  tensor (AdamW keeps two), and since every step has unit size per coordinate it wants a learning
  rate 3-10x smaller than AdamW's.

Both use decoupled weight decay, as AdamW does, and the ``foreach`` kernels that update all of a
group's tensors in a few fused calls.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SignMomentum(torch.optim.Optimizer):
    """Signum; ``momentum=0`` is signSGD (no state)."""

    def __init__(self, params: Iterable, lr: float = 1e-4, momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["momentum"]:
                moments = [self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in params]
                torch._foreach_lerp_(moments, grads, 1 - group["momentum"])
                direction = torch._foreach_sign(moments)
            else:
                direction = torch._foreach_sign(grads)
            _apply(params, direction, group["lr"], group["weight_decay"])
        return loss


class Lion(torch.optim.Optimizer):
    """Lion: sign of the momentum-gradient interpolation; one moment per parameter."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            grads = [p.grad for p in params]
            moments = [self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in params]
            interpolated = torch._foreach_lerp(moments, grads, 1 - beta1)
            _apply(params, torch._foreach_sign(interpolated), group["lr"], group["weight_decay"])
            torch._foreach_lerp_(moments, grads, 1 - beta2)
        return loss


def _apply(params: list[torch.Tensor], direction: list[torch.Tensor], lr: float, weight_decay: float) -> None:
    """``p ← p·(1 - lr·λ) - lr·direction`` (decoupled weight decay)."""
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, direction, alpha=-lr)
