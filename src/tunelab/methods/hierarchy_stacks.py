"""Which adapters a hierarchical-adapter model runs with: the shared one, plus one family's.

The stacks are peft multi-adapter activations on one wrapper (see ``methods.hierarchy``); this
module is what training, evaluation and the router use to switch them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import peft
import torch

from tunelab.errors import UserError
from tunelab.methods.peft_adapters import merge_adapters

SHARED = "default"  # peft's name for the adapter method.lora adds


def adapter_name(family: str) -> str:
    """The peft adapter (and its folder under ``final/adapter/``) of ``family``."""
    return f"family_{family}"


@dataclass
class Hierarchy:
    """What a hierarchical model knows about its stacks (attached to its peft wrapper)."""

    families: list[str]
    family_of_task: dict[str, str]
    shared: bool
    #: ``[families, hidden]`` unit vectors of the router; None until the run computed them (at save).
    centroids: torch.Tensor | None = None

    def stack(self, family: str | None) -> list[str]:
        """The adapters active for ``family`` (None: the shared adapter alone)."""
        return ([SHARED] if self.shared else []) + ([adapter_name(family)] if family is not None else [])

    def family(self, task: str, where: str) -> str:
        """The family of ``task``; a clear error naming ``where`` for a task no family lists."""
        if task in self.family_of_task:
            return self.family_of_task[task]
        raise UserError(f"task {task!r} is in no family of method.hierarchy", where=where, hint=f"its tasks: {', '.join(sorted(self.family_of_task))}")


def peft_wrapper(model: torch.nn.Module) -> peft.PeftModel | None:
    """The peft model in ``model`` (itself, or inside a DDP/compile wrapper)."""
    return next((m for m in model.modules() if isinstance(m, peft.PeftModel)), None)


def hierarchy_of(model: torch.nn.Module) -> Hierarchy | None:
    """The hierarchy of ``model``, if it has one."""
    wrapper = peft_wrapper(model)
    return getattr(wrapper, "tunelab_hierarchy", None) if wrapper is not None else None


@contextlib.contextmanager
def use_stack(model: torch.nn.Module, family: str | None) -> Iterator[None]:
    """Run ``model`` with ``family``'s stack active for as long as the context lasts.

    peft's ``set_adapter`` also marks the active adapters trainable and the others frozen; the
    optimizer was built over every adapter, so the flags are put back as they were: an inactive
    adapter simply gets no gradient.
    """
    wrapper, state = peft_wrapper(model), hierarchy_of(model)
    if wrapper is None or state is None:
        raise ValueError("use_stack needs a model with method.hierarchy")
    names = state.stack(family)
    if not names:  # shared: false and no family: the base model
        with wrapper.disable_adapter():
            yield
        return
    lora = wrapper.base_model
    previous = list(lora.active_adapters)
    flags = [(p, p.requires_grad) for p in wrapper.parameters()]
    try:
        if names != previous:
            lora.set_adapter(names)
        yield
    finally:
        if names != previous:
            lora.set_adapter(previous)
        for param, flag in flags:
            param.requires_grad_(flag)


def merge_stack(model: torch.nn.Module, family: str) -> torch.nn.Module:
    """A plain model with ``family``'s stack (shared + family adapter) folded into its weights."""
    wrapper, state = peft_wrapper(model), hierarchy_of(model)
    if wrapper is None or state is None:
        raise ValueError("merge_stack needs a model with method.hierarchy")
    if family not in state.families:
        raise UserError(f"no family {family!r} in this run", hint=f"its families: {', '.join(state.families)}")
    return merge_adapters(wrapper, adapter_names=state.stack(family))
