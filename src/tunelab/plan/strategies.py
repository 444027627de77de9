"""How devices share a model: the fraction of each parameter group one device holds, and the
buffers a strategy adds.

- ``ddp``: everything replicated; DDP keeps its own flat copy of the trainable gradients (its
  buckets, fp32) next to ``.grad``.
- ``fsdp``: parameters, gradients and optimizer state divided by the devices; one block's full
  weights gathered while it runs and the next block's gathered ahead of it (FSDP2's prefetch:
  two in flight), the root module (embedding, final norm, head) gathered for the whole step, and
  in the backward one block's full gradients before the reduce-scatter.
- ``tp``: each block's linears split over the tensor-parallel degree (weights, gradients, moments,
  and the activations inside attention and the MLP); norms, the embedding and the head replicated.
- ``fsdp+tp``: both: tensor parallelism inside a group of devices, FSDP across the groups.
- ``pp``: blocks spread over the stages; the worst device holds its stage's blocks, the larger of
  the embedding and the head, and (1F1B) the activations of one micro-batch per stage still in
  flight.

The rules follow tunelab's engine (docs/scaling_out.md) and are checked against 2-process runs
(4 for ``fsdp+tp``: bench/plan_accuracy_distributed.py); LoRA adapters are counted as split with
their layer, a fraction of a percent of the memory.
"""

from __future__ import annotations

import math

from tunelab.plan.architecture import Architecture
from tunelab.plan.methods import ParameterGroup
from tunelab.plan.settings import Settings

#: Blocks whose full weights FSDP holds at once: the running one and the prefetched next one.
FSDP_BLOCKS_IN_FLIGHT = 2


def stage_blocks(arch: Architecture, settings: Settings) -> int:
    """Blocks on the busiest device (all of them unless pipelined)."""
    return math.ceil(arch.layers / settings.stages)


def device_share(group: ParameterGroup, arch: Architecture, settings: Settings) -> float:
    """The fraction of ``group`` one device stores."""
    share = 1.0
    if group.kind == "block":
        share *= stage_blocks(arch, settings) / arch.layers
        if group.tp_split:
            share /= settings.tensor_parallel
    elif settings.stages > 1:  # the first stage holds the embedding, the last the head and final norm
        head_side = arch.hidden + (arch.head_params() or arch.embedding_params())
        share *= max(arch.embedding_params(), head_side) / arch.outside_params()
    return share / settings.data_shards


def in_flight_microbatches(settings: Settings) -> int:
    """Micro-batches whose activations the first pipeline stage holds at once under 1F1B."""
    if settings.stages == 1:
        return 1
    return min(settings.stages, settings.microbatches or settings.stages)


def microbatch_rows(settings: Settings) -> int:
    """Examples per forward pass: the batch, or one pipeline micro-batch of it."""
    if settings.stages == 1:
        return settings.batch
    return math.ceil(settings.batch / (settings.microbatches or settings.stages))


def ddp_bucket_bytes(trainable_bytes_per_device: float, settings: Settings) -> float:
    """DDP's gradient buckets: a second fp32 copy of the trainable gradients (several processes)."""
    return trainable_bytes_per_device if settings.strategy == "ddp" and settings.devices > 1 else 0.0


def fsdp_gathered_bytes(arch: Architecture, groups: list[ParameterGroup], settings: Settings) -> tuple[float, float]:
    """``(forward, backward)`` bytes of FSDP's unsharded parameters (and, backward, one block's
    full gradients); zero without FSDP. Shards are gathered in the dtype they are stored in."""
    if settings.data_shards == 1:
        return 0.0, 0.0
    tp = settings.tensor_parallel
    block = sum(g.count * g.weight_bytes / (tp if g.tp_split else 1) for g in groups if g.kind == "block") / arch.layers
    root = sum(g.count * g.weight_bytes for g in groups if g.kind == "outside")
    block_grads = 4 * sum(g.count / (tp if g.tp_split else 1) for g in groups if g.kind == "block" and g.trains) / arch.layers
    forward = FSDP_BLOCKS_IN_FLIGHT * block + root
    return forward, forward + block_grads
