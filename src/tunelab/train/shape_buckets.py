"""Packed rows padded to a multiple of a few tokens where matmul kernels are built per shape.

torch's CPU bf16/fp16 matmuls run oneDNN primitives that are compiled and cached for each matrix
shape (tunelab bounds both caches to 128 entries, ``tunelab/__init__.py``). A packed row's token
count changes every step, so every one of a step's ~25 matmul shapes (SmolLM2 with LoRA) is new:
each is compiled on the spot and takes a cache slot. Padding the row (``tunelab.data.collate.
pad_packed_row``) makes a run's rows come back to a few lengths; the padding is computed by every
matmul (no attention with any example, no loss). The multiple is what that trade measured best at:

- Rows of ``SHORT_ROW_TOKENS`` or more: ``ROW_MULTIPLE``. 40 steps of the benchmark's short
  workload (~380-token rows) in one process, each batch seen once by every variant in turn (AMD
  EPYC AVX-512 BF16, bf16, 2 threads; bench/README.md, "Session 32"): median step 910 ms padded to
  64, 880 ms to 16, 876 ms to 8, 881 ms unpadded. 64's mean padding of ~30 tokens (8% of the row)
  cost more than the kernels it saved; on the AMX Xeon (session 38) 64 was 2% slower there too.
- Shorter rows: ``SHORT_ROW_MULTIPLE``. Their matmuls are bound by per-call cost, not work: on the
  long workload's seed 2 (rows of 96-208 tokens) the forward and backward took the same time
  padded to 64 as to 16 (0.986x, kernels built beforehand), and a step at a length not seen
  recently spends ~25 kernel builds (1-20 ms each) before it computes. Whole runs of the long
  workload, five seeds: 306 tok/s padded to 64 against 276 to 16 (AMX Xeon, session 38).

fp32 matmuls (MKL) and GPU kernels are not built per shape: rows stay unpadded there.
"""

from __future__ import annotations

import torch

from tunelab.hardware import PrecisionChoice

ROW_MULTIPLE = 16  # tokens
SHORT_ROW_MULTIPLE = 64  # tokens, for rows shorter than SHORT_ROW_TOKENS
SHORT_ROW_TOKENS = 256


def pads_rows(precision: PrecisionChoice, device: torch.device) -> bool:
    """Whether packed rows are padded on this device and precision."""
    return device.type == "cpu" and precision.autocast


def row_multiple(length: int) -> int:
    """The multiple a packed row of ``length`` tokens is padded to (where ``pads_rows``)."""
    return SHORT_ROW_MULTIPLE if length < SHORT_ROW_TOKENS else ROW_MULTIPLE
