"""Bit packing: several low-bit codes per byte, so int4 and ternary weights are really smaller.

Widths that divide 8 (1, 2, 4) pack ``8 // bits`` codes into each byte with shifts, which is
cheap enough to undo on every forward pass. Other widths (3, 5, 6, 7) stay one code per byte:
packing them across byte boundaries would cost more time at every forward than it saves.
"""

from __future__ import annotations

import torch


def packs(bits: int) -> bool:
    """Whether codes of this width are stored several per byte."""
    return bits in (1, 2, 4)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, width]`` uint8 codes (< 2**bits) -> ``[rows, ceil(width * bits / 8)]`` bytes."""
    if not packs(bits):
        return codes.to(torch.uint8)
    per = 8 // bits
    rows, width = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.uint8), (0, -width % per)).view(rows, -1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return (padded << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``width`` codes of each row."""
    if not packs(bits):
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)[..., :width]
