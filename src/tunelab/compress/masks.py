"""Pruning masks from importance scores: exact counts per row, layer or model; N:M; sampled.

A mask is a boolean tensor shaped like the weight, True where the weight survives. Every
selector removes exactly ``round(sparsity * n)`` entries of its group (ties are broken by
position, never by letting extra weights through), so the sparsity a user asks for is the
sparsity they get.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from tunelab.errors import UserError


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` if it lies in [0, 1), else a one-line error."""
    if not 0 <= sparsity < 1:
        raise UserError(f"sparsity must be in [0, 1), got {sparsity}", hint="0.5 removes half of the weights")
    return sparsity


def parse_nm(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4): keep N weights in every group of M consecutive inputs."""
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"bad N:M pattern {pattern!r}", hint="write it like '2:4' (keep 2 of every 4)")
    n, m = (int(p) for p in parts)
    if not 0 < n < m:
        raise UserError(f"N:M pattern {pattern!r} needs 0 < N < M", hint="'2:4' keeps 2 weights of every 4")
    return n, m


def lowest(scores: torch.Tensor, sparsity: float, dim: int | None = None) -> torch.Tensor:
    """Mask removing the lowest-scoring ``round(sparsity*n)`` entries of the tensor (or of each slice along ``dim``)."""
    check_sparsity(sparsity)
    if dim is None:
        flat = scores.flatten()
        return _drop(flat, math.floor(sparsity * flat.numel() + 0.5), 0).view_as(scores)
    moved = scores.movedim(dim, -1)
    return _drop(moved, math.floor(sparsity * moved.shape[-1] + 0.5), -1).movedim(-1, dim)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs of each row."""
    if scores.shape[-1] % m:
        raise UserError(f"N:M needs the input width to be a multiple of M: {scores.shape[-1]} is not a multiple of {m}")
    groups = scores.reshape(-1, m)
    return _drop(groups, m - n, -1).view_as(scores)


def sampled(scores: torch.Tensor, sparsity: float, temperature: float, generator: torch.Generator, dim: int | None = None) -> torch.Tensor:
    """Importance sampling: remove exactly ``round(sparsity*n)`` weights drawn without replacement,
    each with probability proportional to ``importance ** (-1/temperature)``.

    Gumbel-top-k: adding Gumbel noise to log-probabilities and taking the top k is an exact draw
    without replacement, and vectorizes over millions of weights.
    """
    log_p = -scores.float().clamp_min(torch.finfo(torch.float32).tiny).log() / temperature
    gumbel = -torch.empty_like(log_p).exponential_(generator=generator).log()
    return lowest(-(log_p + gumbel), sparsity, dim)


def _drop(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        index = torch.topk(scores, k, dim=dim, largest=False, sorted=False).indices
        mask.scatter_(dim, index, False)
    return mask


@torch.no_grad()
def apply_masks(layers: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place (masks stay outside the model: nothing doubles on save)."""
    for name, mask in masks.items():
        layers[name].weight.mul_(mask.to(layers[name].weight.dtype))


def sparsity_of(tensors: Mapping[str, torch.Tensor]) -> float:
    """Fraction of exact zeros over all ``tensors``."""
    total = sum(t.numel() for t in tensors.values())
    zeros = sum(int((t == 0).sum()) for t in tensors.values())
    return zeros / total if total else 0.0
