"""How a torchrun job's processes divide the work: data-parallel groups x model-parallel groups.

Under ``ddp`` and ``fsdp`` every process is its own data-parallel member: it draws its own
micro-batches. Under ``tp`` all processes split every layer and see the same batch (one
data-parallel member); under ``pp`` they hold consecutive ranges of the blocks and likewise share
every batch. Under ``fsdp+tp`` the processes form a (data, tensor) grid: each row of
``tp.degree`` processes splits the layers and shares a batch, and FSDP shards across the rows.
The trainer draws batches, counts tokens and scales the loss by the data-parallel coordinate
(``Layout.data``), never by the raw process rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunelab.errors import UserError
from tunelab.train.config import DistributedConfig
from tunelab.train.distributed import World


def tensor_parallel_degree(settings: DistributedConfig, processes: int) -> int:
    """How many processes split each layer (1 without tensor parallelism)."""
    if "tp" not in settings.strategy or processes <= 1:
        return 1
    degree = settings.tp.degree or processes
    if processes % degree or (settings.strategy == "tp" and degree != processes):
        wanted = "equal to" if settings.strategy == "tp" else "a divisor of"
        raise UserError(
            f"tp.degree {degree} must be {wanted} the number of processes ({processes}) under strategy {settings.strategy}",
            where="train.distributed.tp.degree",
            hint="strategy tp uses every process; combine data parallelism with it as strategy: fsdp+tp" if settings.strategy == "tp"
            else f"pick a divisor of {processes}",
        )
    return degree


def data_parallel_size(settings: DistributedConfig, processes: int) -> int:
    """Processes that draw different batches: what the global batch multiplies by."""
    if settings.strategy == "pp":
        return 1
    return processes // tensor_parallel_degree(settings, processes)


@dataclass(frozen=True)
class Layout:
    """This process's coordinates in the job and the meshes its strategy runs on."""

    #: The data-parallel coordinate: which micro-batches this process draws, and the group token
    #: counts and losses are summed over.
    data: World
    #: Processes FSDP shards over (None: no FSDP).
    shard_mesh: Any = None
    #: Processes that split each layer (None: no tensor parallelism).
    tensor_mesh: Any = None
    #: Processes that hold the pipeline's stages, in order (None: no pipeline).
    pipeline_mesh: Any = None


def layout(world: World, settings: DistributedConfig, device: torch.device) -> Layout:
    """The layout of ``settings.strategy`` over ``world`` (collective: every process builds the
    same device meshes)."""
    if not world.distributed or settings.strategy == "ddp":
        return Layout(data=world)
    from torch.distributed.device_mesh import init_device_mesh

    degree = tensor_parallel_degree(settings, world.size)
    if settings.strategy == "fsdp":
        return Layout(data=world, shard_mesh=init_device_mesh(device.type, (world.size,), mesh_dim_names=("data",)))
    if settings.strategy == "pp":
        return Layout(data=World(), pipeline_mesh=init_device_mesh(device.type, (world.size,), mesh_dim_names=("pipeline",)))
    if settings.strategy == "tp":
        return Layout(data=World(), tensor_mesh=init_device_mesh(device.type, (world.size,), mesh_dim_names=("tensor",)))
    grid = init_device_mesh(device.type, (world.size // degree, degree), mesh_dim_names=("data", "tensor"))
    rows = grid["data"]
    return Layout(data=World(rank=rows.get_local_rank(), size=rows.size(), group=rows.get_group()), shard_mesh=rows, tensor_mesh=grid["tensor"])
