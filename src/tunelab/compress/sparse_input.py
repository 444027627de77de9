"""Activation sparsity at inference: skip the weights that meet (near-)zero inputs when decoding.

Decoding one token is memory-bound: every weight is read once per token for one multiply-add. If
a linear layer's input has a zero in feature ``j``, row ``j`` of ``Wᵀ`` contributes nothing, so
reading it is wasted. Two ways to get such zeros:

- TEAL (Liu et al. 2024, training-free): inputs whose magnitude is below a per-layer threshold are
  treated as zero. The threshold is the ``sparsity`` quantile of the layer's input magnitudes on
  calibration text (``calibration.input_magnitude_quantiles``), so about that fraction is skipped.
- A ReLU-fied model (``method.activation``): the MLP's ``down_proj`` input ``relu(gate) · up`` is
  exactly zero wherever the gate is negative; ``sparsity: 0`` (threshold 0) skips exactly those.

A ReLU-fied model decodes fastest with ``sparsify: gated-mlp`` (``SparseGatedMLP``): its gate says
exactly which intermediate channels are zero, so ``up_proj``'s rows for those are skipped too.

The layer stores ``Wᵀ`` (``[in, out]``, one contiguous row per input feature). A one-row input
(batch-1 decoding) multiplies only the rows of its non-zero features: PyTorch's ``embedding_bag``
with per-sample weights is exactly ``Σⱼ xⱼ · Wᵀ[j]`` over the given rows, fbgemm's vectorised
kernel, reading nothing else (``bench/activation_sparsity.py`` measures it against the dense
product). Above ``DENSE_ABOVE`` of the features active, the dense product is faster and is used.
Several rows (prefill, scoring) multiply densely after zeroing the skipped features, so perplexity
and task scores measure exactly the function decoding computes.

``weights: int8`` keeps ``Wᵀ`` as fbgemm's row-wise 8-bit format (a float scale and offset per
input feature), read by ``embedding_bag_byte``: a quarter of the bytes per active row.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tunelab.activations import FlooredReLU
from tunelab.compress.calibration import closed_fractions, input_magnitude_quantiles
from tunelab.compress.modules import set_module
from tunelab.compress.sparse_layers import (
    RELU_FAMILY,
    SparseGatedMLP,
    SparseInputLinear,
    WeightFormat,
)
from tunelab.compress.targets import linear_layers
from tunelab.errors import UserError
from tunelab.methods.activation import gated_mlps, mlp_activation


def sparsify_activations(
    model: nn.Module, sparsity: float, *, weights: WeightFormat = "fp32", targets: Iterable[str] = (), chunks: torch.Tensor | None = None
) -> dict[str, Any]:
    """Replace the target linears by :class:`SparseInputLinear` with thresholds for ``sparsity``.

    ``sparsity`` 0 sets every threshold to 0: only exact zeros are skipped and the model computes
    the same function. Otherwise the thresholds come from ``chunks`` (calibration text). The report
    gives the fraction of inputs skipped on the calibration text (for ``sparsity`` 0 with chunks:
    the exact zeros the model makes by itself).
    """
    layers = linear_layers(model, targets)
    if sparsity > 0 and chunks is None:
        raise UserError("activation thresholds are calibrated on text", where="compress.calibration",
                        hint="set compress.calibration (e.g. examples/data/heldout/calibration.txt), or sparsity: 0 for exact zeros only")
    thresholds, skipped = {name: 0.0 for name in layers}, {}
    if chunks is not None:
        thresholds, skipped = input_magnitude_quantiles(model, layers, chunks, sparsity)
    for name, layer in layers.items():
        set_module(model, name, SparseInputLinear.from_linear(layer, thresholds[name], weights))
    report: dict[str, Any] = {"sparsified_layers": len(layers), "weights": weights}
    if skipped:
        report["activation_sparsity"] = sum(skipped.values()) / len(skipped)
        report["activation_sparsity_by_kind"] = _by_kind(skipped)
    return report


def sparsify_gated_mlps(model: nn.Module, chunks: torch.Tensor | None = None, weights: WeightFormat = "fp32") -> dict[str, Any]:
    """Replace every gated MLP of a ReLU-fied model by :class:`SparseGatedMLP` (the same function,
    up to int8 rounding with ``weights="int8"``; a floored ReLU's floors go with it); with
    ``chunks``, report the fraction of intermediate channels that are closed on that text."""
    act, mlps = mlp_activation(model), gated_mlps(model)
    if act not in RELU_FAMILY or not mlps:
        raise UserError(f"sparsify: gated-mlp needs a ReLU-fied gated MLP; this model's MLP activation is {act or 'not a gated MLP'}",
                        where="compress.variants", hint="fine-tune it with method.activation: {mlp: relu} first, or use sparsify: activations")
    if any(m.gate_proj.bias is not None or m.up_proj.bias is not None or m.down_proj.bias is not None for m in mlps.values()):
        raise UserError("sparsify: gated-mlp supports MLPs without biases (Llama-style)", where="compress.variants",
                        hint="use sparsify: activations with sparsity: 0 and targets: [down_proj]")
    report: dict[str, Any] = {"sparsified_mlps": len(mlps), "weights": weights}
    floors = {name: m.act_fn.floor for name, m in mlps.items() if isinstance(m.act_fn, FlooredReLU)}
    if floors:
        report["floored"] = True
    if chunks is not None:
        closed = closed_fractions(model, {name: m.act_fn for name, m in mlps.items()}, chunks)
        report["activation_sparsity"] = sum(closed.values()) / len(closed)
    for name, mlp in mlps.items():
        set_module(model, name, SparseGatedMLP.from_mlp(mlp, act, weights, floor=floors.get(name)))
    return report


def _by_kind(values: dict[str, float]) -> dict[str, float]:
    """Mean over layers of each kind (the last name component: q_proj, down_proj, ...)."""
    kinds: dict[str, list[float]] = {}
    for name, value in values.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(value)
    return {kind: round(sum(v) / len(v), 4) for kind, v in kinds.items()}
