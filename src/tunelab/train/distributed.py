"""Data-parallel training on PyTorch's own engine: ``torchrun`` sets the environment, we join.

Under ``torchrun --nproc-per-node N`` each process trains on its shard of every global batch and
DistributedDataParallel averages gradients, or, with ``train.distributed.strategy: fsdp``, FSDP2
shards the model (``tunelab.train.sharding``). Only rank 0 logs and writes. There is no home-made
distribution layer.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tunelab.errors import PeerLost

#: What a collective's error says when a process on the other end died or stopped answering
#: (gloo's TCP pairs, NCCL, the rendezvous store).
_PEER_LOST = re.compile(r"connection (reset|closed) by peer|broken pipe|timed out|nccl error|socket timeout", re.IGNORECASE)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    #: The process group ``all_sum`` sums over (None: every process); a data-parallel group under tensor parallelism.
    group: Any = None

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
        dist.all_reduce(tensor, group=self.group)
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


def init_world(device: torch.device, timeout_s: float | None = None) -> World:
    """Join the process group when launched by torchrun (collectives waiting at most ``timeout_s``
    for a silent process; None: PyTorch's default); a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return World(rank=dist.get_rank(), size=dist.get_world_size())


@contextlib.contextmanager
def lost_peers_reported(world: World, run_dir: Path) -> Iterator[None]:
    """A collective that fails because another process of the job died or stopped answering ends
    this process with one line (its rank, what the backend said, how to continue) instead of a
    traceback through the C++ frames of the communication library, which says nothing more."""
    try:
        yield
    except RuntimeError as exc:
        if not world.distributed or not _PEER_LOST.search(str(exc)):
            raise
        said = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0])[:200]  # drop gloo's source-file prefix
        raise PeerLost(
            f"rank {world.rank}: another process of this job stopped or stopped answering ({said})",
            hint=f"its own log says why; continue from the last checkpoint with the same launcher: ... -m tunelab.cli train --resume {run_dir}",
        ) from None


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
