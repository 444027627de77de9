"""Unstructured and N:M pruning: score every weight, pick the ones to drop, zero them.

Criteria:
- ``magnitude``: ``|W|``.
- ``wanda``: ``|W| · ‖X_j‖₂`` (Sun et al. 2023), compared within each output row by default;
  the input norms come from a few calibration batches, no weight update needed.
- ``taylor``: ``Σ |W · ∂L/∂W|`` from the task loss on calibration text, or from the KL to a
  teacher's predictions (knowledge-driven pruning).
Any criterion can be sampled instead of thresholded (importance-sampled stochastic pruning).
The returned masks let a training loop re-apply them after each optimizer step.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn

from tunelab.compress import calibration, masks
from tunelab.compress.targets import linear_layers
from tunelab.errors import UserError

CRITERIA = ("magnitude", "wanda", "taylor")


def prune_weights(
    model: nn.Module,
    criterion: str = "magnitude",
    sparsity: float = 0.5,
    *,
    pattern: str | None = None,
    scope: str | None = None,
    targets: Iterable[str] = (),
    chunks: torch.Tensor | None = None,
    sampled: bool = False,
    temperature: float = 1.0,
    teacher: nn.Module | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Prune ``model``'s target linears in place and return the masks (True = kept), by layer name."""
    masks.check_sparsity(sparsity)
    layers = linear_layers(model, targets)
    scores = importance(model, layers, criterion, chunks, teacher)
    chosen = select(scores, sparsity, pattern=pattern, scope=scope or ("row" if criterion == "wanda" else "layer"),
                    sampled=sampled, temperature=temperature, seed=seed)
    masks.apply_masks(layers, chosen)
    return chosen


def importance(
    model: nn.Module,
    layers: dict[str, nn.Module],
    criterion: str,
    chunks: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Per-weight importance of every layer under ``criterion``."""
    if criterion not in CRITERIA:
        raise UserError(f"unknown pruning criterion {criterion!r}", hint="choose one of " + ", ".join(CRITERIA))
    if criterion != "magnitude" and chunks is None:
        raise UserError(f"{criterion} pruning needs calibration text", hint="set compress.calibration to a text file")
    if teacher is not None and criterion != "taylor":
        raise UserError("a teacher only informs taylor pruning", hint="set prune: taylor or drop the teacher")
    if criterion == "magnitude":
        return {name: layer.weight.detach().abs().float() for name, layer in layers.items()}
    if criterion == "wanda":
        norms = calibration.input_norms(model, layers, chunks)
        return {name: layer.weight.detach().abs().float() * norms[name][None, :] for name, layer in layers.items()}
    return calibration.taylor_importance(model, layers, chunks, teacher)


def select(
    scores: dict[str, torch.Tensor],
    sparsity: float,
    *,
    pattern: str | None = None,
    scope: str = "layer",
    sampled: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Masks removing the least important weights: per row, per layer, globally, or N:M."""
    if pattern is not None:
        if sampled:
            raise UserError("importance sampling and an N:M pattern cannot be combined", hint="drop one of them")
        n, m = masks.parse_nm(pattern)
        return {name: masks.nm_mask(s, n, m) for name, s in scores.items()}
    if scope not in ("row", "layer", "global"):
        raise UserError(f"unknown pruning scope {scope!r}", hint="choose row, layer or global")
    if sampled:
        generator = torch.Generator().manual_seed(seed)
        pick = functools.partial(masks.sampled, temperature=temperature, generator=generator)
    else:
        pick = masks.lowest
    if scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        return _split(pick(flat, sparsity), scores)
    dim = 1 if scope == "row" else None
    return {name: pick(s, sparsity, dim=dim) for name, s in scores.items()}


def _split(flat_mask: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, tensor in like.items():
        out[name] = flat_mask[start : start + tensor.numel()].view_as(tensor)
        start += tensor.numel()
    return out
