"""The optimizer registry (``train.optimizer``): each entry builds an optimizer from the trainer's
parameter groups (which carry their own ``lr`` and ``weight_decay``) and the ``train:`` section.

A new optimizer is one ``register_optimizer`` call; the recipe accepts its name from then on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from tunelab.errors import UserError
from tunelab.plugins import Registry
from tunelab.train.sign_optimizers import Lion, SignMomentum

#: ``build(parameter_groups, train_config) -> Optimizer`` by recipe name (``train.optimizer``).
OptimizerBuilder = Callable[[list[dict], Any], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer", "train.optimizer")


def register_optimizer(name: str) -> Callable[[OptimizerBuilder], OptimizerBuilder]:
    """Register ``build(groups, cfg)`` under ``name``; each group carries its ``lr`` and ``weight_decay``."""

    def wrap(build: OptimizerBuilder) -> OptimizerBuilder:
        OPTIMIZERS.register(name, build)
        return build

    return wrap


def _adam_kernel(groups: list[dict]) -> dict[str, bool]:
    """Adam's fused kernel (one pass per parameter doing the whole update) where every parameter
    is a floating-point CPU/CUDA tensor, else foreach kernels. On CPU foreach still runs ~10 ops per
    parameter: for SmolLM2's 420 LoRA tensors a step took 21-23 ms with foreach and 5.7-6.3 ms
    fused (bench/README.md, "Session 25"). Sharded parameters (fsdp's DTensors) take the fused
    kernel too (DTensor runs it shard by shard), so a run resumed under another strategy keeps
    the update arithmetic it had (the two kernels round differently). The kernel
    takes one kind per call, so tensor parallelism's mix of DTensors and plain tensors keeps foreach."""
    params = [p for group in groups for p in group["params"]]
    one_kind = len({isinstance(p, DTensor) for p in params}) <= 1
    fusable = one_kind and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return {"fused": True} if fusable else {"foreach": True}


# foreach kernels update all parameters of a group in a few fused ops instead of a Python loop.
register_optimizer("adamw")(lambda groups, cfg: torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **_adam_kernel(groups)))
register_optimizer("adam")(lambda groups, cfg: torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, **_adam_kernel(groups)))
register_optimizer("sgd")(lambda groups, cfg: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=True))
register_optimizer("signum")(lambda groups, cfg: SignMomentum(groups, lr=cfg.lr, momentum=cfg.momentum))
register_optimizer("signsgd")(lambda groups, cfg: SignMomentum(groups, lr=cfg.lr, momentum=0.0))
# Adafactor keeps factored second moments (a row and a column vector per matrix) and no first moment.
register_optimizer("adafactor")(lambda groups, cfg: torch.optim.Adafactor(groups, lr=cfg.lr, foreach=True))


@register_optimizer("adamw8bit")
def _adamw_8bit(groups: list[dict], cfg: Any) -> torch.optim.Optimizer:
    """AdamW with both moments stored in 8 bits (bitsandbytes' block-wise quantisation: 2 bytes per
    parameter instead of 8). Tensors under 4,096 elements keep fp32 moments, as bitsandbytes does."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise UserError("train.optimizer adamw8bit needs bitsandbytes", where="train.optimizer",
                        hint=f"pip install bitsandbytes, or choose adamw ({exc})") from None
    return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas)


@register_optimizer("lion")
def _lion(groups: list[dict], cfg: Any) -> torch.optim.Optimizer:
    """Lion with its own default betas (0.9, 0.99) unless the recipe sets train.betas."""
    return Lion(groups, lr=cfg.lr, betas=cfg.betas if "betas" in cfg.model_fields_set else (0.9, 0.99))
