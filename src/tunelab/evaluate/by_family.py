"""Evaluating a hierarchical-adapter run: each item answered by its task family's adapter stack.

An item names its task in ``eval.task_field`` (the family follows from the run's
``method.hierarchy.families``); an item that names none -- or every item, when the field is not
set -- goes to the run's router. The items of each family are scored together under that family's
stack with the ordinary task runner, then put back in their order and scored as one set, so the
metrics mean what they mean for any other run. Every record says which family answered it and
whether the router chose it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from tunelab.data.readers import Row
from tunelab.errors import UserError
from tunelab.evaluate.prompts import PromptBuilder
from tunelab.evaluate.tasks import TASKS, TaskInputs, TaskOutput, scores_from_records
from tunelab.methods.hierarchy_router import route
from tunelab.methods.hierarchy_stacks import Hierarchy, use_stack


def item_families(state: Hierarchy, model: torch.nn.Module, tokenizer: Any, items: Sequence[Row], builder: PromptBuilder, task_field: str | None) -> tuple[list[str], list[bool]]:
    """Each item's family, and whether the router picked it (the item named no task)."""
    named = [row.fields.get(task_field) if task_field else None for row in items]
    families: list[str | None] = [state.family(str(task), row.where) if task is not None else None for row, task in zip(items, named)]
    unnamed = [i for i, family in enumerate(families) if family is None]
    if unnamed:
        prompts = [tokenizer(builder.context(items[i]), add_special_tokens=builder.add_special_tokens)["input_ids"] for i in unnamed]
        for i, family in zip(unnamed, route(model, prompts)):
            families[i] = family
    return [f for f in families if f is not None], [task is None for task in named]


def evaluate_by_family(model: torch.nn.Module, tokenizer: Any, inputs: TaskInputs, state: Hierarchy, progress: str | None = None) -> TaskOutput:
    """``inputs`` scored item by item under the stack of the item's family (see the module docstring)."""
    cfg = inputs.cfg
    if cfg.task == "perplexity":
        raise UserError("perplexity of a hierarchical-adapter run needs one family's stack", where="eval.task", hint="evaluate the run with choice or generation items that name their task (eval.task_field)")
    start = time.perf_counter()
    families, routed = item_families(state, model, tokenizer, inputs.items, inputs.builder, cfg.task_field)
    records: list[dict[str, Any] | None] = [None] * len(inputs.items)
    seconds = time.perf_counter() - start
    for family in dict.fromkeys(families):
        members = [i for i, f in enumerate(families) if f == family]
        group = TaskInputs([inputs.items[i] for i in members], cfg, inputs.builder, inputs.pool, inputs.pool_is_items, inputs.shots)
        with use_stack(model, family):
            output = TASKS[cfg.task](model, tokenizer, group, progress=f"{progress} [{family}]" if progress else None)
        seconds += output.seconds
        for i, record in zip(members, output.records):
            records[i] = {**record, "family": family, "routed": routed[i]}
    complete = [r for r in records if r is not None]
    return TaskOutput(scores_from_records(cfg, complete), complete, seconds)
