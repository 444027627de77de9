"""Packed rows padded to a multiple of ``ROW_MULTIPLE`` tokens where matmul kernels are built per shape.

torch's CPU bf16/fp16 matmuls run oneDNN primitives that are compiled and cached for each matrix
shape (tunelab bounds both caches to 128 entries, ``tunelab/__init__.py``). A packed row's token
count changes every step, so every one of a step's ~25 matmul shapes (SmolLM2 with LoRA) is new:
each is compiled on the spot and takes a cache slot. Padding the row to a multiple of
``ROW_MULTIPLE`` tokens (``tunelab.data.collate.pad_packed_row``) makes a run of short chat rows
come back to a few dozen shapes; the padding is computed by every matmul (no attention with any
example, no loss). The multiple is what that trade measured best at: 40 steps of the benchmark's
short workload in one process, each batch seen once by every variant in turn (AMD EPYC AVX-512
BF16, bf16, 2 threads; bench/README.md, "Session 32"): median step 910 ms padded to 64, 880 ms to
16, 876 ms to 8, 881 ms unpadded. A new shape costs ~1% of a step; 64's mean padding of ~30
tokens (8% of a ~380-token row) cost more. fp32 matmuls (MKL) and GPU kernels are not built per
shape: rows stay unpadded there.
"""

from __future__ import annotations

import torch

from tunelab.hardware import PrecisionChoice

ROW_MULTIPLE = 16  # tokens


def row_multiple(precision: PrecisionChoice, device: torch.device) -> int:
    """The multiple packed rows are padded to on this device and precision; 0: no padding."""
    return ROW_MULTIPLE if device.type == "cpu" and precision.autocast else 0
