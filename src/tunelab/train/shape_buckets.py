"""Packed rows padded to a multiple of ``ROW_MULTIPLE`` tokens where matmul kernels are built per shape.

torch's CPU bf16/fp16 matmuls run oneDNN primitives that are compiled and cached for each matrix
shape (tunelab bounds both caches to 128 entries, ``tunelab/__init__.py``). A packed row's token
count changes every step, so every one of a step's ~25 matmul shapes (SmolLM2 with LoRA) is new:
each is compiled on the spot and takes a cache slot. Padding the row to a multiple of 64 tokens
(``tunelab.data.collate.pad_packed_row``) makes a run of short chat rows come back to a handful of
shapes. The padding costs at most 63 tokens of compute per row (no attention with any example, no
loss). Measured side by side, alternating, on the benchmark's short workload (bench/README.md,
"Session 24"). fp32 matmuls (MKL) and GPU kernels are not built per shape: rows stay unpadded there.
"""

from __future__ import annotations

import torch

from tunelab.hardware import PrecisionChoice

ROW_MULTIPLE = 64  # tokens


def row_multiple(precision: PrecisionChoice, device: torch.device) -> int:
    """The multiple packed rows are padded to on this device and precision; 0: no padding."""
    return ROW_MULTIPLE if device.type == "cpu" and precision.autocast else 0
