"""Which examples form each micro-batch: a pure function of (seed, epoch, step, rank).

Because the order is computed, not streamed, resuming at step k needs no replay, and every
process of a data-parallel run knows its shard without communication. An optimizer step covers
``G = batch_size * grad_accum * world_size`` consecutive examples of the epoch's permutation;
micro-batch j of rank r takes the slice at offset ``(j * world_size + r) * batch_size``. One
process with batch ``2B`` and two with ``B`` therefore see the same examples in each step.
"""

from __future__ import annotations

import torch


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def steps_per_epoch(num_examples: int, batch_size: int, grad_accum: int, world_size: int) -> int:
    """Whole optimizer steps in one epoch (a tail smaller than one global batch is skipped)."""
    return num_examples // (batch_size * grad_accum * world_size)


def micro_batches(order: list[int], step_in_epoch: int, batch_size: int, grad_accum: int, rank: int, world_size: int) -> list[list[int]]:
    """The example indices of each of this rank's micro-batches for one optimizer step."""
    start = step_in_epoch * batch_size * grad_accum * world_size
    return [
        order[start + (j * world_size + rank) * batch_size : start + (j * world_size + rank + 1) * batch_size]
        for j in range(grad_accum)
    ]


def step_indices(order: list[int], step_in_epoch: int, batch_size: int, grad_accum: int, world_size: int) -> list[int]:
    """Every example of one optimizer step, across all ranks (for counting supervision units)."""
    start = step_in_epoch * batch_size * grad_accum * world_size
    return order[start : start + batch_size * grad_accum * world_size]
