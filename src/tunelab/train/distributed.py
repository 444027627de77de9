"""Data-parallel training on PyTorch's own engine: ``torchrun`` sets the environment, we join.

Under ``torchrun --nproc-per-node N`` each process trains on its shard of every global batch and
DistributedDataParallel averages gradients, or, with ``train.distributed.strategy: fsdp``, FSDP2
shards the model (``tunelab.train.sharding``). Only rank 0 logs and writes. There is no home-made
distribution layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, value: float) -> float:
        """Sum a number over processes (token counts, losses for logging)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (e.g. the run directory rank 0 created)."""
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (per-process state a checkpoint keeps)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's decision (e.g. early stopping) for everyone."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([int(flag)])
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())


def init_world(device: torch.device) -> World:
    """Join the process group when launched by torchrun; a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size())


def wrap_model(model: torch.nn.Module, world: World, *, find_unused_parameters: bool = False, bucket_cap_mb: float | None = None) -> torch.nn.Module:
    """DistributedDataParallel over the trainable parameters when running on several processes;
    ``find_unused_parameters`` when a step may leave some of them without a gradient;
    ``bucket_cap_mb`` overrides DDP's gradient bucket size (its default when None)."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, find_unused_parameters=find_unused_parameters, bucket_cap_mb=bucket_cap_mb)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
