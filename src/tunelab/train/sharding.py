"""Fully sharded data parallel (FSDP2) for the engine: ``train.distributed.strategy: fsdp``.

``fully_shard`` goes on every transformer block and then on the whole model, so each process
keeps 1/N of every parameter, gradient and optimizer state, and a block's weights are gathered
only while it runs. Everything else the engine does is unchanged, with three consequences of
the parameters being DTensor shards:

- checkpoints gather every trainable tensor and optimizer state to full size (``full``), so a
  checkpoint is the same file whatever the number of processes that wrote it, and a run resumes
  on any number of processes, sharded or not (``like`` cuts a full tensor to this process's
  shard on load);
- the final save and whatever runs after training (evaluation, compression) need an ordinary
  module: a parameter-free copy of the model is taken on the meta device before sharding
  (``meta_skeleton``) and filled at the end with the weights gathered, one at a time, to the
  main process's CPU (``gathered_weights``, ``materialize``), ties (a shared embedding and LM
  head) kept;
- every forward is collective, so every process evaluates, not only the first.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from tunelab.methods.blocks import block_list
from tunelab.train.config import FsdpConfig


def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no memory), buffers shared.

    ``deepcopy`` with every parameter pre-entered in its memo: the module tree, configs and
    attached objects are copied, the weights are not; a parameter shared by two modules stays
    shared in the copy.
    """
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer
    return copy.deepcopy(model, memo)


def shard(model: torch.nn.Module, mesh: Any, cfg: FsdpConfig, low_precision: torch.dtype | None) -> None:
    """Apply FSDP2 to ``model`` in place over ``mesh`` (each block, then the root).

    ``low_precision``: the dtype parameters are gathered in when ``cfg.mixed_precision`` (None
    or fp32: no mixed-precision policy; autocast then works on fp32 shards as in one process).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": cfg.reshard_after_forward}
    if cfg.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    if cfg.mixed_precision and low_precision not in (None, torch.float32):
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=low_precision, reduce_dtype=torch.float32)
    _, blocks = block_list(model)
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)


def is_shard(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(value: Any) -> Any:
    """``value`` with every DTensor in it gathered to its full size (collective: every process
    calls it, in the same order); other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.full_tensor() if is_shard(value) else value
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full(v) for v in value)
    return value


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (full size, the same on every process) as ``param`` holds it: this process's
    shard when ``param`` is sharded, ``value`` itself otherwise. No communication: each process
    cuts its own shard from the copy it read."""
    if not is_shard(param) or value.shape != param.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)


def localize_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """A full-size optimizer state (``optimizer.state_dict()`` gathered) cut to this process's
    shards, so ``optimizer.load_state_dict`` accepts it: moment tensors shaped like their
    parameter become its shard; scalars (the step count) stay as they are."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {index: {k: like(params[index], v) if isinstance(v, torch.Tensor) else v for k, v in per_param.items()}
             for index, per_param in saved["state"].items()}
    return {**saved, "state": state}


def gathered_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of ``model`` at full size on the main process's CPU, ``{}`` on the others
    (collective): one tensor is gathered at a time and moved off the device, so no process ever
    holds the whole model on its device."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def materialize(skeleton: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """``skeleton`` filled with ``weights`` (full size, by name): an ordinary module equal to the
    trained one. A parameter the skeleton shares between two names (a tied embedding and LM head)
    is one parameter again, filled from whichever of its names ``weights`` holds."""
    named = list(skeleton.named_parameters(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for name, param in named:
        aliases.setdefault(id(param), []).append(name)
    made: dict[int, torch.nn.Parameter] = {}
    for name, param in named:
        if id(param) not in made:
            value = next(weights[alias] for alias in aliases[id(param)] if alias in weights)
            made[id(param)] = torch.nn.Parameter(value.detach(), requires_grad=param.requires_grad)
        owner, _, attribute = name.rpartition(".")
        setattr(skeleton.get_submodule(owner), attribute, made[id(param)])
    return skeleton


def clip_grad_norm_(parameters: list[torch.nn.Parameter], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` for gradients that may mix whole tensors and DTensors
    of different meshes (tensor parallelism splits some layers and keeps norms whole), or sparse
    embedding gradients (``train.sparse_updates``), which torch's version cannot take a norm of:
    each gradient's norm is taken whole (collective for a split one; over the coalesced values for
    a sparse one), then every gradient is scaled by the same factor."""
    for param in parameters:
        if param.grad is not None and param.grad.is_sparse:
            param.grad = param.grad.coalesce()  # rows used by several tokens add up before the norm
    grads = [p.grad for p in parameters if p.grad is not None]
    whole = not any(is_shard(g) for g in grads) or all(is_shard(g) and g.device_mesh == grads[0].device_mesh for g in grads)
    if whole and not any(g.is_sparse for g in grads):
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return
    norms = [full(torch.linalg.vector_norm((g._values() if g.is_sparse else g).detach(), 2.0, dtype=torch.float32)) for g in grads]
    total = float(torch.linalg.vector_norm(torch.stack(norms), 2.0))
    scale = min(1.0, max_norm / (total + 1e-6))
    if scale < 1.0:
        for g in grads:
            (g._values() if g.is_sparse else g).detach().mul_(scale)


@contextlib.contextmanager
def gradients_kept_local(model: torch.nn.Module) -> Iterator[None]:
    """Accumulate gradients without reduce-scattering them (every micro-batch but a step's last)."""
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]
