"""Apply a variant's steps (from the ``compress:`` recipe section) to a model, in order."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunelab.compress import structured
from tunelab.compress.config import PruneStep, QuantizeStep, SparsifyStep
from tunelab.compress.masks import sparsity_of
from tunelab.compress.prune import prune_weights
from tunelab.compress.quantize import quantize
from tunelab.compress.sparse_input import sparsify_activations, sparsify_gated_mlps
from tunelab.errors import UserError
from tunelab.methods.activation import floored_relus

STRUCTURED = {"mlp": structured.prune_mlp_channels, "heads": structured.prune_heads, "blocks": structured.prune_blocks}


def apply_steps(
    model: nn.Module, steps: list[PruneStep | QuantizeStep | SparsifyStep], chunks: torch.Tensor | None, seed: int = 0
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Run every step on ``model``; returns the compressed model and one report per step."""
    reports = []
    for step in steps:
        if floored_relus(model):
            _check_keeps_floors(step)
        if isinstance(step, QuantizeStep):
            model, report = quantize(model, step.quantize, group_size=step.group_size, bits=step.bits, activations=step.activations,
                                     smooth=step.smooth, targets=step.targets, keep=step.keep, keep_sensitive=step.keep_sensitive, chunks=chunks)
        elif isinstance(step, SparsifyStep) and step.sparsify == "gated-mlp":
            report = sparsify_gated_mlps(model, chunks, weights=step.weights)
        elif isinstance(step, SparsifyStep):
            report = sparsify_activations(model, step.sparsity, weights=step.weights, targets=step.targets, chunks=chunks)
        elif step.prune in STRUCTURED:
            report = STRUCTURED[step.prune](model, step.sparsity, chunks)
        else:
            report = _unstructured(model, step, chunks, seed)
        reports.append({"step": step.model_dump(exclude_defaults=True), **report})
    return model, reports


def _check_keeps_floors(step: PruneStep | QuantizeStep | SparsifyStep) -> None:
    """Refuse the steps whose saved model cannot carry a floored ReLU's floors: NF4 is saved as a
    plain bitsandbytes model, and structured pruning reshapes the MLPs the floors belong to."""
    if isinstance(step, QuantizeStep) and step.quantize == "nf4" or isinstance(step, PruneStep) and step.prune in STRUCTURED:
        what = f"quantize: {step.quantize}" if isinstance(step, QuantizeStep) else f"prune: {step.prune}"
        raise UserError(f"{what} cannot keep the floors of this model's floored ReLUs (method.activation.floor)",
                        where="compress.variants", hint="use int8/int4 quantization, unstructured pruning or sparsify steps on a floored model")


def _unstructured(model: nn.Module, step: PruneStep, chunks: torch.Tensor | None, seed: int) -> dict[str, Any]:
    teacher = None
    if step.teacher:
        from tunelab.models import load_model

        teacher = load_model(step.teacher).model.eval()
    masks = prune_weights(model, step.prune, step.sparsity, pattern=step.pattern, scope=step.scope, targets=step.targets,
                          chunks=chunks, sampled=step.sampled, temperature=step.temperature, teacher=teacher, seed=seed)
    weights = {name: model.get_submodule(name).weight.detach() for name in masks}
    return {"pruned_layers": len(masks), "sparsity": sparsity_of(weights)}
