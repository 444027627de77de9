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


class SignOptimizer(torch.optim.Optimizer):
    """The shared step: each group's parameters with gradients move by ``-lr·direction`` (plus decay);
    subclasses say what the direction is and update their momentum."""

    def direction(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def after_step(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """State updates that come after the parameters moved (Lion's momentum)."""

    @torch.no_grad()
    def step(self, closure=None):  # torch.optim.Optimizer.step signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            update = self.direction(group, params, grads)
            if group["weight_decay"]:  # decoupled, as AdamW
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, update, alpha=-group["lr"])
            self.after_step(group, params, grads)
        return loss

    def moments(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in params]


class SignMomentum(SignOptimizer):
    """Signum; ``momentum=0`` is signSGD (no state)."""

    def __init__(self, params: Iterable, lr: float = 1e-4, momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def direction(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if not group["momentum"]:
            return torch._foreach_sign(grads)
        moments = self.moments(params)
        torch._foreach_lerp_(moments, grads, 1 - group["momentum"])
        return torch._foreach_sign(moments)


class Lion(SignOptimizer):
    """Lion: sign of the momentum-gradient interpolation; one moment per parameter."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    def direction(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return torch._foreach_sign(torch._foreach_lerp(self.moments(params), grads, 1 - group["betas"][0]))

    def after_step(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        torch._foreach_lerp_(self.moments(params), grads, 1 - group["betas"][1])
