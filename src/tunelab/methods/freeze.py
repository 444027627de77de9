"""Layer freezing: embeddings, the first/last N blocks, or parameters matched by regex.

Frozen parameters have ``requires_grad=False``, so autograd never computes their gradients; when
everything below block k is frozen, backward stops at block k (no gradient flows to inputs that
do not need one), which is where freezing saves compute, not just optimizer memory.
"""

from __future__ import annotations

import re

import torch

from tunelab.errors import UserError
from tunelab.methods.base import Method, MethodContext, register_method
from tunelab.methods.blocks import block_index, block_list
from tunelab.methods.config import FreezeConfig


def apply_freeze(model: torch.nn.Module, cfg: FreezeConfig) -> torch.nn.Module:
    """Set ``requires_grad=False`` on everything ``cfg`` names; returns the same model.

    Runs before any method adds modules, so ``base`` freezes exactly the pretrained weights; a
    task head's fresh weights are marked trainable again by the head method, which runs later.
    """
    if cfg.base:
        for param in model.parameters():
            param.requires_grad_(False)
    blocks_name, blocks = block_list(model)
    depth = len(blocks)
    if cfg.first_n + cfg.last_n > depth:
        raise UserError(f"method.freeze: first_n + last_n = {cfg.first_n + cfg.last_n} but the model has {depth} blocks")
    frozen_blocks = set(range(cfg.first_n)) | set(range(depth - cfg.last_n, depth))
    include = [re.compile(p) for p in cfg.include]
    exclude = [re.compile(p) for p in cfg.exclude]
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()} if cfg.embeddings else set()
    matched = {p.pattern: 0 for p in include}
    for name, param in model.named_parameters():
        hit = id(param) in embeddings or block_index(name, blocks_name) in frozen_blocks
        for pattern in include:
            if pattern.search(name):
                matched[pattern.pattern] += 1
                hit = True
        if hit and not any(p.search(name) for p in exclude):
            param.requires_grad_(False)
    unmatched = [p for p, n in matched.items() if n == 0]
    if unmatched:
        example = next(iter(dict(model.named_parameters())))
        raise UserError(f"method.freeze.include: {unmatched[0]!r} matches no parameter", hint=f"names look like {example!r}")
    return model


@register_method
class FreezeMethod(Method):
    key = "freeze"
    Config = FreezeConfig
    order = 20

    def apply(self, model: torch.nn.Module, cfg: FreezeConfig, ctx: MethodContext) -> torch.nn.Module:
        return apply_freeze(model, cfg)
