"""``method.hierarchy``: hierarchical adapters -- one LoRA adapter shared by every task, and one per
task family stacked on it.

A family is a group of related tasks named in the recipe (``families: {money: [banking, credit_cards]}``);
each training row names its task (``data.task_column``). The shared adapter is ``method.lora``'s;
this method adds one LoRA adapter per family on the same layers (rank ``r``, default the shared
adapter's). A batch of family F runs with the stack *shared + F* active: both adapters' low-rank
updates add to the frozen weights, so the shared one can learn what every task has in common and F
what its tasks add. Every micro-batch holds one family's rows (``methods.hierarchy_batches``), so
only the shared adapter and that family's receive gradient from it. ``shared: false`` trains the
family adapters alone (the shared adapter stays at its identity initialisation and is never
active): with one task per family, that is separate adapters per task in one run at the same cost
per step -- the baseline a hierarchy is measured against, with one flat adapter (plain method.lora).

Inference picks the stack for a task by name (evaluation reads each row's task from
``eval.task_field``) or, for a row that names none, with the router (``methods.hierarchy_router``,
its centroids saved in ``final/hierarchy.safetensors``). Nothing is merged until asked:
``merge_stack`` folds one family's stack into a plain model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import peft
import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file

from tunelab.config_base import Section
from tunelab.errors import UserError
from tunelab.methods.base import Method, MethodContext, register_method
from tunelab.methods.hierarchy_stacks import (
    SHARED,
    Hierarchy,
    adapter_name,
    hierarchy_of,
)
from tunelab.methods.peft_adapters import ADAPTER_DIR, is_peft_model, lora_config_like

STATE_FILE = "hierarchy.safetensors"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class HierarchyConfig(Section):
    """Hierarchical adapters: method.lora's adapter shared by all tasks, plus one per task family."""

    families: dict[str, list[str]] = Field(
        ..., description="{family: [task, ...]}: every task (data.task_column value) in exactly one family; one task per family = adapters per task."
    )
    shared: bool = Field(True, description="Train the shared adapter (method.lora) under every family's; false: the family adapters alone.")
    r: int | None = Field(None, gt=0, description="Rank of each family adapter; default: method.lora.r.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha of each family adapter; default: method.lora.alpha.")
    router_examples: int = Field(64, gt=0, description="Training prompts per family averaged into the router's centroid.")

    @field_validator("families")
    @classmethod
    def _families(cls, families: dict[str, list[str]]) -> dict[str, list[str]]:
        if not families:
            raise ValueError("name at least one family")
        seen: dict[str, str] = {}
        for name, tasks in families.items():
            if not _NAME.match(name):
                raise ValueError(f"family name {name!r}: use letters, digits, '_' and '-' (it names the adapter's folder)")
            if not tasks:
                raise ValueError(f"family {name!r} lists no task")
            for task in tasks:
                if task in seen:
                    raise ValueError(f"task {task!r} is in families {seen[task]!r} and {name!r}: put it in one")
                seen[task] = name
        return families


@register_method
class HierarchyMethod(Method):
    """Hierarchical adapters (see the module docstring)."""

    key = "hierarchy"
    Config = HierarchyConfig
    order = 52  # after method.lora (50) adds the shared adapter, before method.init (95) draws them
    mergeable = False  # one model per family: merge_stack folds the one you choose

    def apply(self, model: torch.nn.Module, cfg: HierarchyConfig, ctx: MethodContext) -> torch.nn.Module:
        if not is_peft_model(model) or not isinstance(model.peft_config.get(SHARED), peft.LoraConfig):
            raise UserError("hierarchical adapters stack LoRA adapters: set method.lora (the shared adapter's settings)", where="method.hierarchy", hint="add method.lora: {r: 8}")
        if ctx.model_task != "causal-lm":
            raise UserError("hierarchical adapters train a causal LM's own answers, not a task head", where="method.hierarchy", hint="remove method.head")
        shared_config = model.peft_config[SHARED]
        for family in cfg.families:
            model.add_adapter(adapter_name(family), lora_config_like(shared_config, cfg.r, cfg.alpha))
        model = _attach(model, cfg)
        family_parts = tuple(f".{adapter_name(f)}." for f in cfg.families)
        for name, param in model.named_parameters():
            if any(part in name for part in family_parts):
                param.requires_grad_(True)
            elif f".{SHARED}." in name:
                param.requires_grad_(cfg.shared)
        return model

    def save(self, model: torch.nn.Module, cfg: HierarchyConfig, directory: Path) -> list[str]:
        """The router's centroids (the adapters are in ``adapter/``, which peft writes for method.lora)."""
        state = hierarchy_of(model)
        if state is None or state.centroids is None:
            return []
        save_file({"centroids": state.centroids.contiguous()}, str(directory / STATE_FILE), metadata={"families": json.dumps(state.families)})
        return [STATE_FILE]

    def load(self, model: torch.nn.Module, cfg: Any, directory: Path, ctx: MethodContext) -> torch.nn.Module:
        cfg = HierarchyConfig.model_validate(cfg) if isinstance(cfg, dict) else cfg
        if not is_peft_model(model):
            raise UserError("this hierarchical run's adapters are missing", where=str(directory / ADAPTER_DIR))
        for family in cfg.families:
            model.load_adapter(str(directory / ADAPTER_DIR / adapter_name(family)), adapter_name=adapter_name(family))
        model = _attach(model, cfg)
        if (directory / STATE_FILE).exists():
            model.tunelab_hierarchy.centroids = load_file(str(directory / STATE_FILE))["centroids"]
        return model

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        if hierarchy_of(model) is not None:
            raise UserError("a hierarchical-adapter run is one model per family", hint="fold one family's stack: tunelab.methods.hierarchy_stacks.merge_stack(model, family)")
        return model

    def wire(self, cfg: HierarchyConfig, prepared: Any, recipe: Any) -> None:
        from tunelab.methods.hierarchy_batches import (
            route_batches_by_family,  # training code: loading a run never imports it
        )

        route_batches_by_family(cfg, prepared, recipe)


def _attach(model: torch.nn.Module, cfg: HierarchyConfig) -> torch.nn.Module:
    """Record the hierarchy on the peft wrapper and make the shared stack the active one."""
    state = Hierarchy(list(cfg.families), {task: family for family, tasks in cfg.families.items() for task in tasks}, cfg.shared)
    model.tunelab_hierarchy = state
    if state.shared:
        model.base_model.set_adapter([SHARED])
    return model
