"""Sharded checkpoints (``train.distributed.fsdp.checkpoint: sharded``): each process writes its
own shards of the trainable weights and the optimizer's state with ``torch.distributed.checkpoint``
(DCP), so nothing is ever gathered on one host; DCP re-cuts them on load, so a checkpoint written
by N processes resumes on any number of processes, sharded or not, or in one plain process.

The rest of a checkpoint (scheduler, RNG, callbacks, state.json) is small and written by rank 0
beside the ``sharded/`` folder, as in a full checkpoint (``tunelab.train.checkpoint``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: The folder inside a checkpoint that holds the DCP files (``.metadata`` and one ``.distcp`` per process).
SHARDED = "sharded"


def _options():  # type: ignore[no-untyped-def]
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # a LoRA run's base weights never change: not saved, and not expected back on load
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _trainable(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without frozen weights under any of their names: torch's ``ignore_frozen_params``
    drops a frozen parameter under its first name only, so a tied LM head (the embedding's second
    name) stayed in, and a model that holds it under one name alone (a pipeline's last stage)
    wrote no such key for the others to find."""
    frozen = {name for name, param in model.named_parameters(remove_duplicate=False) if not param.requires_grad}
    return {name: value for name, value in state.items() if name not in frozen}


def save(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write this process's shards into ``directory/sharded`` (collective: every process calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": _trainable(model, model_state), "optimizer": optimizer_state}, checkpoint_id=directory / SHARDED)


def load(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Fill ``model`` (and ``optimizer``) from ``directory/sharded``, cut to how they are held now."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

    if optimizer is None:
        state = {"model": _trainable(model, get_model_state_dict(model, options=_options()))}
        dcp.load(state, checkpoint_id=directory / SHARDED)
        set_model_state_dict(model, state["model"], options=_options())
        return
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
    state = {"model": _trainable(model, model_state), "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory / SHARDED)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=_options())


def is_sharded(directory: Path) -> bool:
    return (directory / SHARDED).is_dir()
