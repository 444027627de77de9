"""Training a hierarchical-adapter model: every micro-batch holds one family's rows and runs with
that family's stack.

``route_batches_by_family`` adjusts a wired-up run (``tunelab.train.prepared.Prepared``): each
example's ``task`` becomes its family's index (so the ``task_mix`` sampler draws one family per
micro-batch, and validation batches never mix families), the collated batch carries that index,
and the objective runs each batch -- forward and backward, which activation checkpointing
re-runs -- inside ``use_stack``. Nothing in the training loop knows about families.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tunelab.data import Example
from tunelab.errors import UserError
from tunelab.methods.hierarchy_router import compute_centroids
from tunelab.methods.hierarchy_stacks import Hierarchy, hierarchy_of, use_stack
from tunelab.train.samplers import SAMPLERS, SamplerContext
from tunelab.train.task_mix import TaskMixConfig

#: The collated batch's key holding its family's index (the objective wrapper reads and removes it).
BATCH_KEY = "hierarchy_family"


class FamilyStackObjective:
    """The run's objective, each batch under its family's stack (``BATCH_KEY`` removed first)."""

    def __init__(self, inner: Any, families: list[str]):
        self.inner, self.families = inner, families

    def __getattr__(self, name: str) -> Any:  # name, collation, unit_name, ...: the wrapped objective's
        if name in ("inner", "families"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _split(self, batch: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
        rest = {k: v for k, v in batch.items() if k != BATCH_KEY}
        return self.families[int(batch[BATCH_KEY])], rest

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return self.inner.units(self._split(batch)[1])

    def summarize(self, stats: dict[str, Any]) -> dict[str, float]:
        return self.inner.summarize(stats)

    def attention_scope(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
        """The family's stack (and the wrapped objective's own attention mode) over forward and backward."""
        family, rest = self._split(batch)
        scope = contextlib.ExitStack()
        scope.enter_context(use_stack(model, family))
        inner = getattr(self.inner, "attention_scope", None)
        if inner is not None:
            scope.enter_context(inner(model, rest))
        return scope

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        family, rest = self._split(batch)
        with use_stack(model, family):
            return self.inner(model, rest)


def _tag_families(state: Hierarchy, examples: list[Example], where: str) -> None:
    index = {family: i for i, family in enumerate(state.families)}
    for example in examples:
        if example.task_name is None:
            raise UserError("hierarchical adapters need each row's task", where="data.task_column", hint="set data.task_column to the column naming each row's task")
        example.task = index[state.family(example.task_name, where)]


def _one_family(collate: Callable[[list[Example]], dict[str, torch.Tensor]]) -> Callable[[list[Example]], dict[str, torch.Tensor]]:
    def collate_family(examples: list[Example]) -> dict[str, torch.Tensor]:
        family = examples[0].task
        if any(e.task != family for e in examples):
            raise ValueError("a hierarchical-adapter micro-batch must hold one family's rows (check the sampler)")
        return {**collate(examples), BATCH_KEY: torch.tensor(family)}

    return collate_family


def route_batches_by_family(cfg: Any, prepared: Any, recipe: Any) -> None:
    """Wire ``prepared`` (a ``Prepared`` run) for method.hierarchy ``cfg`` (see the module docstring)."""
    state = hierarchy_of(prepared.model)
    if state is None:
        raise ValueError("method.hierarchy did not attach its state")
    if recipe.data.task_column is None:
        raise UserError("hierarchical adapters need each row's task", where="data.task_column", hint="set data.task_column to the column naming each row's task")
    if recipe.sampler is not None and recipe.sampler.name != "task_mix":
        raise UserError(f"sampler {recipe.sampler.name} would mix families in one batch", where="sampler.name", hint="use task_mix (the default for method.hierarchy)")
    _tag_families(state, prepared.data.train, f"data.train ({recipe.data.task_column} column)")
    _tag_families(state, prepared.data.validation, f"data.validation ({recipe.data.task_column} column)")
    trained = {e.task for e in prepared.data.train}
    idle = [family for i, family in enumerate(state.families) if i not in trained]
    if idle:
        raise UserError(f"family {idle[0]!r} has no training rows", where=f"method.hierarchy.families.{idle[0]}", hint="check its task names against the data's task column")
    # The default order; a task_mix section (rebuilt from these tags) or an objective that draws its
    # own batches (meta-learning's episodes: one task each, so one family) replaces it.
    prepared.sampler = SAMPLERS.get("task_mix").build(TaskMixConfig(), SamplerContext(prepared.data.train, recipe.train.batch_size, recipe.seed))
    prepared.collate = _one_family(prepared.collate)
    prepared.objective = FamilyStackObjective(prepared.objective, state.families)
    prepared.uses_all_parameters = False  # under DDP other families' adapters get no gradient in a step
    save = prepared.save

    def save_with_router(run_dir: Path, trained: torch.nn.Module) -> Path:
        compute_centroids(trained, prepared.data.train, cfg.router_examples)
        return save(run_dir, trained)

    prepared.save = save_with_router
