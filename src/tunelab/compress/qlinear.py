"""Weight-only quantized linear layers: packed integer codes plus scales, dequantized per forward.

Every weight format here is affine, ``w ≈ (code - zero) · scale`` with one scale and zero per
group of ``group_size`` inputs of a row, which keeps one storage layout and one dequantizer:
- ``int8`` / ``int4``: asymmetric min/max per group (the usual weight-only scheme).
- ``ternary``: codes {0, 1, 2} = {-1, 0, +1}, scale = mean |w| of the group (BitNet b1.58's
  absmean), 2 bits per weight.
- ``fixed-point``: dynamic fixed point, one Q-format per tensor: the integer bits are the fewest
  that hold the tensor's largest magnitude, the rest of ``bits`` (after the sign) are fraction
  bits, so the scale is a power of two.
Storing codes packed (see ``packing``) is what makes the model smaller in RAM and on disk; the
price is a dequantization at every forward, so these formats trade speed for size on CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.compress import bitpack
from tunelab.errors import UserError

WEIGHT_FORMATS = ("int8", "int4", "ternary", "fixed-point")


@dataclass(frozen=True)
class QuantSpec:
    """A weight format: ``format`` in WEIGHT_FORMATS, group size (None: whole row), fixed-point width."""

    format: str
    group_size: int | None = 128
    bits: int = 8

    def __post_init__(self) -> None:
        if self.format not in WEIGHT_FORMATS:
            raise UserError(f"unknown weight format {self.format!r}", hint="choose one of " + ", ".join(WEIGHT_FORMATS))
        if self.format == "fixed-point" and not 2 <= self.bits <= 8:
            raise UserError(f"fixed-point width must be 2..8 bits, got {self.bits}")

    @property
    def code_bits(self) -> int:
        """Bits stored per weight."""
        return {"int8": 8, "int4": 4, "ternary": 2}.get(self.format, self.bits)

    def groups(self, width: int, where: str = "") -> int:
        """Scale groups per row for a layer ``width`` inputs wide (1 per tensor for fixed point)."""
        if self.format == "fixed-point":
            return 1
        size = self.group_size or width
        if width % size:
            raise UserError(
                f"{self.format} group size {size} does not divide the layer width {width}",
                where=where or None,
                hint=f"use a divisor of {width}, e.g. {math.gcd(width, 128)}, or group_size: null for one scale per row",
            )
        return width // size


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, where: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes uint8 [out, in], scale f32 [out|1, groups], zero uint8 [out|1, groups])`` for ``weight``."""
    out, width = weight.shape
    w = weight.detach().float()
    if spec.format == "fixed-point":
        largest = w.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
        integer_bits = math.floor(math.log2(largest.item())) + 1  # 2**integer_bits > largest
        scale = torch.full((1, 1), 2.0 ** (integer_bits - (spec.bits - 1)))
        half = 2 ** (spec.bits - 1)
        codes = (torch.round(w / scale) + half).clamp(0, 2 * half - 1)
        return codes.to(torch.uint8), scale, torch.full((1, 1), half, dtype=torch.uint8)
    groups = spec.groups(width, where)
    g = w.view(out, groups, width // groups)
    if spec.format == "ternary":
        scale = g.abs().mean(-1).clamp_min(torch.finfo(torch.float32).tiny)
        zero = torch.ones_like(scale)
        levels = 2
    else:
        levels = 2**spec.code_bits - 1
        low = g.amin(-1).clamp(max=0)  # keep 0 exactly representable (pruned weights stay zero)
        high = g.amax(-1).clamp(min=0)
        scale = ((high - low) / levels).clamp_min(torch.finfo(torch.float32).tiny)
        zero = torch.round(-low / scale).clamp(0, levels)
    codes = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, levels)
    return codes.view(out, width).to(torch.uint8), scale, zero.to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) · scale`` group-wise, as float32 ``[out, in]``."""
    out, width = codes.shape
    groups = scale.shape[-1]
    g = codes.view(out, groups, width // groups).float()
    return ((g - zero[..., None].float()) * scale[..., None]).view(out, width)


def fake_quantize(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The weight as the quantized model will see it (quantize, then dequantize)."""
    return dequantize(*quantize_weight(weight, spec)).to(weight.dtype)


class QuantLinear(nn.Module):
    """A Linear whose weight is stored as packed codes + group scales (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = True, where: str = ""):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        groups = spec.groups(in_features, where)
        rows = 1 if spec.format == "fixed-point" else out_features
        stored = math.ceil(in_features * spec.code_bits / 8) if bitpack.packs(spec.code_bits) else in_features
        self.register_buffer("codes", torch.zeros(out_features, stored, dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(rows, groups))
        self.register_buffer("zero", torch.zeros(rows, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, where: str = "") -> QuantLinear:
        """Quantize an ``nn.Linear``."""
        layer = cls(linear.in_features, linear.out_features, spec, bias=linear.bias is not None, where=where)
        codes, scale, zero = quantize_weight(linear.weight, spec, where)
        layer.codes = bitpack.pack(codes, spec.code_bits)
        layer.scale, layer.zero = scale, zero
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().float().clone()
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """The dequantized float32 weight (built on demand, never kept)."""
        codes = bitpack.unpack(self.codes, self.spec.code_bits, self.in_features)
        return dequantize(codes, self.scale, self.zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def describe(self) -> dict:
        """What a loader needs to rebuild this layer before loading its tensors."""
        return {**asdict(self.spec), "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec}"
