"""Checkpoints that a kill can never corrupt, and that resume a run bit-exactly.

A checkpoint holds the trainable parameters (safetensors), optimizer and scheduler state, RNG
states, every callback's own state (``callbacks.pt``) and the data position. It is written into a temporary directory and renamed into place
(``atomic.directory``), so ``checkpoints/`` only ever contains complete checkpoints.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunelab import atomic
from tunelab.rundir import checkpoint_path, list_checkpoints, reporting_disk_full
from tunelab.train import sharded_checkpoint, sharding
from tunelab.train.callbacks import Callback

CALLBACK_STATE = "callbacks.pt"
PROCESS_STATE = "process_state.pt"  # per data-parallel process: gradient-compression residuals


def rng_state() -> dict[str, Any]:
    """Every random source a step draws from (dropout and sampling: torch; augmentation: Python)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by name; a tensor shared by two names (tied weights) appears once."""
    seen: set[int] = set()
    out: dict[str, torch.nn.Parameter] = {}
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            out[name] = param
    return out


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors by name, full size (gathered when sharded: every process calls this), on
    the CPU, each stored once."""
    return {name: sharding.full(param.detach()).cpu().contiguous() for name, param in trainable_parameters(model).items()}


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    info: dict[str, Any],
    callbacks: Sequence[Callback] = (),
    rng: dict[str, Any] | None = None,
    per_process: list[Any] | None = None,
    started: Path | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically: ``weights`` (``trainable_state``) and
    ``optimizer_state`` (``{"optimizer": ..., "scheduler": ...}`` state dicts, full size). ``rng``
    is the random state the next step must start from (default: the current one; an interrupted
    step passes the state from before it began); ``per_process`` is state each data-parallel
    process keeps for itself, in rank order (gradient-compression residuals), which
    ``process_state`` gives back to each. ``started``: the temporary directory the processes
    already wrote their shards into (``tunelab.train.sharded_checkpoint``; then ``weights`` and
    the optimizer's state are empty here)."""
    target = checkpoint_path(run_dir, step)
    needed = _tensor_bytes(weights) + _tensor_bytes(optimizer_state)
    with reporting_disk_full(run_dir, f"checkpoint step {step}", needed), atomic.directory(target, started) as tmp:
        if weights:
            save_file(weights, str(tmp / "trainable.safetensors"))
        _torch_save(optimizer_state, tmp / "optimizer.pt")
        _torch_save(rng or rng_state(), tmp / "rng.pt")
        _torch_save({cb.name: cb.state_dict() for cb in callbacks}, tmp / CALLBACK_STATE)
        if per_process is not None:
            _torch_save(per_process, tmp / PROCESS_STATE)
        (tmp / "state.json").write_text(json.dumps({"step": step, **info}, indent=2, default=str))
    return target


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so a full disk surfaces as an ``OSError`` in the chain."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def _tensor_bytes(tree: Any) -> int:
    """Bytes of every tensor in a nested state (what a checkpoint needs on disk, roughly)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def prune_checkpoints(run_dir: Path, keep_last: int, best: Path | None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and the best one."""
    checkpoints = list_checkpoints(run_dir)
    for path in checkpoints[:-keep_last]:
        if best is None or path.resolve() != best.resolve():
            shutil.rmtree(path, ignore_errors=True)


def _load_full(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, optimizer_state: dict[str, Any] | None) -> None:
    """Full-size tensors, whatever wrote them; a sharded model takes its own shard of each."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = set(weights) - set(params)
    if missing:
        raise ValueError(f"checkpoint {path} has parameters the model lacks: {sorted(missing)[:3]}")
    model.load_state_dict({name: sharding.like(params[name], value) for name, value in weights.items()}, strict=False)
    if optimizer is not None and optimizer_state is not None:
        optimizer.load_state_dict(sharding.localize_optimizer_state(optimizer, optimizer_state))


def process_state(path: Path, rank: int) -> Any:
    """Process ``rank``'s own state saved with checkpoint ``path`` (empty when it has none: a
    checkpoint from before gradients were compressed, or from fewer processes)."""
    if not (path / PROCESS_STATE).exists():
        return {}
    states = torch.load(path / PROCESS_STATE, weights_only=False)
    return states[rank] if rank < len(states) else {}


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, callbacks: Sequence[Callback] = ()
) -> dict[str, Any]:
    """Restore parameters (and optimizer, scheduler, RNG, callbacks' state when given); returns the saved info."""
    states = torch.load(path / "optimizer.pt", weights_only=False) if optimizer is not None else {}
    if sharded_checkpoint.is_sharded(path):  # each process wrote its shards: DCP re-cuts them for how the model is held now
        sharded_checkpoint.load(path, model, optimizer)
    else:
        _load_full(path, model, optimizer, states.get("optimizer"))
    if optimizer is not None:
        scheduler.load_state_dict(states["scheduler"])
        rng = torch.load(path / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
    saved = torch.load(path / CALLBACK_STATE, weights_only=False) if (path / CALLBACK_STATE).exists() else {}
    for cb in callbacks:
        if cb.name in saved:
            cb.load_state_dict(saved[cb.name])
    return json.loads((path / "state.json").read_text())
