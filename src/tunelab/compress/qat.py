"""Quantization-aware training: train through fake-quantized weights, then convert exactly.

During training each chosen layer computes with ``fake_quantize(w)``, the weight the quantized
model will use, while gradients flow to the float weight unchanged (straight-through
estimator). The float weights stay the trainable parameters, so an optimizer built before
``prepare_qat`` keeps working. ``convert_qat`` quantizes those same float weights with the same
function, so the converted model's outputs equal the fake-quant outputs bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.compress.modules import set_module
from tunelab.compress.qlinear import QuantLinear, QuantSpec, fake_quantize
from tunelab.compress.targets import linear_layers


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized weight. Backward: the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:  # type: ignore[override]
        return fake_quantize(weight, spec)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


class FakeQuantLinear(nn.Module):
    """Wraps an ``nn.Linear`` (sharing its parameters) and computes with fake-quantized weights."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec, where: str = ""):
        super().__init__()
        spec.groups(linear.in_features, where)  # a bad group size fails before training starts
        self.linear, self.spec = linear, spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _StraightThrough.apply(self.linear.weight, self.spec), self.linear.bias)


def prepare_qat(model: nn.Module, spec: QuantSpec, targets: Iterable[str] = ()) -> list[str]:
    """Wrap the target linears in fake quantization; returns their names."""
    layers = linear_layers(model, targets)
    wrappers = {name: FakeQuantLinear(layer, spec, name) for name, layer in layers.items()}
    for name, wrapper in wrappers.items():
        set_module(model, name, wrapper)
    return list(wrappers)


def unwrap_qat(model: nn.Module) -> list[str]:
    """Put the float linears back (keeping their trained weights), e.g. to save a plain HF model."""
    names = [name for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)]
    for name in names:
        set_module(model, name, model.get_submodule(name).linear)
    return names


def convert_qat(model: nn.Module) -> list[str]:
    """Replace every fake-quantized layer by its packed ``QuantLinear``; returns their names."""
    names = [name for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)]
    for name in names:
        wrapper = model.get_submodule(name)
        set_module(model, name, QuantLinear.from_linear(wrapper.linear, wrapper.spec, name))
    return names
