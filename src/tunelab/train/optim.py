"""Optimizer and learning-rate schedule from the recipe.

Weight decay skips norms, biases and embeddings by default (decaying them hurts and is what the
reference recipes avoid). Layer-wise LR decay gives block i of L the rate ``lr * decay^(L-1-i)``:
deeper blocks adapt more, embeddings least, heads at the full rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tunelab.errors import UserError
from tunelab.methods.blocks import block_index, block_list
from tunelab.train.config import TrainConfig
from tunelab.train.optimizers import OPTIMIZERS
from tunelab.train.sharding import is_shard
from tunelab.train.sparse_updates import sparse_embedding, with_sparse_rows


def _no_decay(name: str, param: torch.nn.Parameter, embedding_ids: set[int]) -> bool:
    return param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") or id(param) in embedding_ids


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Group trainable parameters by (weight decay, LR scale)."""
    if cfg.lr == "auto":
        raise ValueError("train.lr is 'auto': resolve it with tunelab.train.auto_settings.resolve before building an optimizer")
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    blocks_name, blocks = block_list(model)
    depth = len(blocks)
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if (not cfg.decay_norms_biases_embeddings and _no_decay(name, param, embedding_ids)) else cfg.weight_decay
        scale = 1.0
        if cfg.layer_lr_decay < 1.0:
            index = block_index(name, blocks_name)
            if index is not None:
                scale = cfg.layer_lr_decay ** (depth - 1 - index)
            elif id(param) in embedding_ids:
                scale = cfg.layer_lr_decay**depth
        groups.setdefault((decay, scale), []).append(param)
    return [{"params": ps, "weight_decay": d, "lr": cfg.lr * s, "lr_scale": s} for (d, s), ps in groups.items()]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg)
    if not groups:
        raise UserError("no trainable parameters: every parameter is frozen", where="method", hint="unfreeze something (method.freeze) or add an adapter (method.lora)")
    if cfg.sparse_updates:
        optimizer = with_sparse_rows(OPTIMIZERS.get(cfg.optimizer), groups, sparse_embedding(model), cfg)
    else:
        optimizer = OPTIMIZERS.get(cfg.optimizer)(groups, cfg)
    if any(len({is_shard(p) for p in group["params"]}) > 1 for group in optimizer.param_groups):
        optimizer.register_step_pre_hook(_loop_over_mixed_groups)
    return optimizer


def _loop_over_mixed_groups(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Tensor parallelism splits some parameters (DTensors) and keeps others whole, and foreach
    kernels refuse such a mix: a group holding both steps parameter by parameter. Set before
    every step, because loading a checkpoint restores each group's saved ``foreach``."""
    for group in optimizer.param_groups:
        if group.get("foreach") and len({is_shard(p) for p in group["params"]}) > 1:
            group["foreach"] = False


def lr_multiplier(step: int, total: int, cfg: TrainConfig) -> float:
    """Schedule value at ``step`` (0-based) of ``total``: linear warmup then constant/linear/cosine."""
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


#: ``adjust(step, total, scheduled) -> multiplier``: a callback's say over the schedule (SWA's LR).
LRAdjust = Callable[[int, int, float], float]


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: TrainConfig, adjust: Sequence[LRAdjust] = ()
) -> torch.optim.lr_scheduler.LambdaLR:
    def multiplier(step: int) -> float:
        value = lr_multiplier(step, total_steps, cfg)
        for change in adjust:
            value = change(step, total_steps, value)
        return value

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (moments, factored statistics,
    quantisation maps) in this process (its shards under fsdp): what the choice of optimizer and
    strategy costs in memory, measured, not assumed."""
    return sum(
        local.numel() * local.element_size()
        for per_param in optimizer.state.values() for value in per_param.values() if isinstance(value, torch.Tensor)
        for local in [value.to_local() if is_shard(value) else value]
    )
