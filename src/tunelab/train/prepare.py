"""From a recipe to what the trainer needs: model, data, objective, collation and how to save.

The training stage (``run``) stays one straight line because every task shape is decided here:
no head (causal LM: SFT, or continued pretraining on ``text`` rows), one head
(``method.head``, see ``tunelab.methods.heads``), or several tasks over one body
(``method.tasks``, see ``tunelab.train.multitask``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tunelab import rewrite  # noqa: F401  (installs model-written augmentation for the data stage)
from tunelab.data import (
    DataBundle,
    Example,
    build_datasets,
    collate_packed,
    collate_padded,
    preference_sequences,
)
from tunelab.data.config import DataConfig
from tunelab.errors import UserError
from tunelab.methods import active_methods, apply_methods
from tunelab.methods.artifacts import save_final
from tunelab.methods.config import HeadConfig
from tunelab.methods.heads import (
    check_model_fits,
    head_label_names,
    model_kwargs,
    plan_for,
)
from tunelab.models import load_model
from tunelab.models.load import peek_config
from tunelab.models.vision import image_inputs
from tunelab.recipe import Recipe
from tunelab.train import auto_settings
from tunelab.train.embedding_artifacts import save_embedding_final
from tunelab.train.example_scores import example_losses
from tunelab.train.multitask import prepare_multitask
from tunelab.train.objectives import (
    OBJECTIVES,
    Objective,
    ObjectiveContext,
    build_objective,
)
from tunelab.train.objectives.base import (
    attach_objective_modules,
    detach_objective_modules,
)
from tunelab.train.prepared import Prepared, head_collate, masking, pad_token_id
from tunelab.train.samplers import SAMPLERS, SamplerContext
from tunelab.train.starting_point import load_starting_point


def prepare(recipe: Recipe, device: torch.device | None = None) -> Prepared:
    """Load, prepare and wire up the run ``recipe`` describes (auxiliary models go to ``device``)."""
    device = device or torch.device("cpu")
    if recipe.method.tasks:
        if recipe.objective is not None:
            raise UserError("a multi-task run takes each task's objective from that task", where="objective", hint="move it under method.tasks.<task>.objective")
        if recipe.sampler is not None and recipe.sampler.name != "task_mix":
            raise UserError(f"sampler {recipe.sampler.name} would mix tasks in one batch", where="sampler.name", hint="use task_mix (the default for method.tasks)")
        prepared = prepare_multitask(recipe)
    elif recipe.method.head is None:
        prepared = _prepare_causal_lm(recipe, device)
    else:
        prepared = _prepare_head(recipe, recipe.method.head, device)
    for method, method_cfg in active_methods(recipe.method):
        method.wire(method_cfg, prepared, recipe)
    objective_sampler = OBJECTIVES.get(recipe.objective.name).sampler if recipe.objective is not None else None
    if objective_sampler is not None:
        if recipe.sampler is not None:
            raise UserError(f"objective {recipe.objective.name} draws its own batches; sampler {recipe.sampler.name} would replace them", where="sampler", hint="remove the sampler section")
        prepared.sampler = objective_sampler(recipe.objective, SamplerContext(prepared.data.train, recipe.train.batch_size, recipe.seed))
    elif recipe.sampler is not None and not recipe.method.tasks:
        plugin = SAMPLERS.get(recipe.sampler.name)
        context = SamplerContext(prepared.data.train, recipe.train.batch_size, recipe.seed, _losses_under(recipe, prepared, device))
        prepared.sampler = plugin.build(recipe.sampler, context)
    objective = recipe.objective.name if recipe.objective is not None else None
    prepared.train_cfg, prepared.notes = auto_settings.resolve(recipe.train, recipe.method, len(prepared.data.train), objective)
    return prepared


def _losses_under(recipe: Recipe, prepared: Prepared, device: torch.device) -> Callable[[str], list[float]]:
    """Each training example's loss under model ``name`` (a curriculum's teacher), loaded as the
    run's model class, through the run's own objective rebuilt around it and the run's collation."""

    def score(name: str) -> list[float]:
        teacher = load_model(name, prepared.model_task, tokenizer=recipe.model.tokenizer, seed=recipe.seed).model  # type: ignore[arg-type]
        teacher.eval().to(device).requires_grad_(False)
        ctx = ObjectiveContext(teacher, prepared.tokenizer, prepared.data.label_names, prepared.data.train, recipe.method.head, device, recipe.seed, model_name=name)
        objective = build_objective(prepared.objective.name, recipe.objective, ctx)
        return example_losses(teacher, objective, prepared.collate, prepared.data.train, device=device)

    return score


def _objective(recipe: Recipe, default: str, ctx: ObjectiveContext) -> Objective:
    """The recipe's ``objective:`` choice, else the one the model's head implies."""
    chosen = recipe.objective
    ctx.default_objective = default
    return build_objective(chosen.name if chosen is not None else default, chosen, ctx)


def _example_shape(recipe: Recipe, data_section: DataConfig) -> str:
    """What a causal-LM run's examples are: the chosen objective's own shape (preference pairs),
    raw text, or conversations."""
    plugin = OBJECTIVES.get(recipe.objective.name) if recipe.objective is not None else None
    if plugin is not None and plugin.shape is not None:
        return plugin.shape
    return "text" if data_section.format == "text" else "sft"


def _causal_lm_collate(objective: Objective, recipe: Recipe, pad_id: int) -> Callable[[list[Example]], dict[str, torch.Tensor]]:
    """Packed rows (with the shared prefix held once and the inputs no target reads left out, when
    the objective reads that layout) or right-padded ones; preference pairs become their two
    sequences first. Pipeline stages send fixed-shape activations (``strategy: pp``): padded rows there."""
    packed = objective.collation == "packed" and recipe.data.packing and recipe.train.distributed.strategy != "pp"
    share_prefix = bool(getattr(objective, "shared_prefix", False))
    group_size = getattr(objective, "prefix_group", None)
    drop_unread = bool(getattr(objective, "drops_unread_inputs", False))

    def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
        if examples and examples[0].group_labels is not None:
            examples = preference_sequences(examples)
        return collate_packed(examples, share_prefix, group_size, drop_unread) if packed else collate_padded(examples, pad_id)

    return collate


def _objective_data(recipe: Recipe, ctx: ObjectiveContext) -> DataConfig:
    """The data section, or the one the chosen objective makes (a teacher's answers)."""
    chosen = recipe.objective
    plugin = OBJECTIVES.get(chosen.name) if chosen is not None else None
    return plugin.data(chosen, ctx, recipe.data) if plugin is not None and plugin.data is not None else recipe.data


def _prepare_causal_lm(recipe: Recipe, device: torch.device) -> Prepared:
    loaded = load_starting_point(recipe, "causal-lm")
    tokenizer = loaded.tokenizer
    ctx = ObjectiveContext(loaded.model, tokenizer, device=device, seed=recipe.seed, model_name=recipe.model.name)
    data_section = _objective_data(recipe, ctx)
    images = image_inputs(loaded.model, tokenizer)
    data = build_datasets(data_section, tokenizer, shape=_example_shape(recipe, data_section), seed=recipe.seed, images=images)  # type: ignore[arg-type]
    model = apply_methods(loaded.model, recipe.method, model_task="causal-lm", tokenizer_dir=loaded.details.get("directory"), tokenizer=loaded.tokenizer)
    ctx.model, ctx.label_names, ctx.train = model, data.label_names, data.train
    objective = _objective(recipe, "causal_lm", ctx)
    attach_objective_modules(model, objective)
    collate = _causal_lm_collate(objective, recipe, pad_token_id(tokenizer))

    def save(run_dir: Path, trained: torch.nn.Module) -> Path:
        detach_objective_modules(trained)
        return save_final(run_dir, trained, tokenizer, base=recipe.model.name, model_task="causal-lm", section=recipe.method, label_names=data.label_names)

    return Prepared(model, tokenizer, loaded.source, data, objective, collate, save, recipe.train)


def _prepare_head(recipe: Recipe, head: HeadConfig, device: torch.device) -> Prepared:
    plan = plan_for(head, recipe.objective.name if recipe.objective is not None else None)
    check_model_fits(head, peek_config(recipe.model.name))
    loaded = load_starting_point(recipe, plan.model_task)
    data = build_datasets(recipe.data, loaded.tokenizer, shape=plan.example_shape, seed=recipe.seed)  # type: ignore[arg-type]
    model, label_names = build_head_model(recipe, head, data, loaded)
    tokenizer = loaded.tokenizer
    objective = _objective(recipe, plan_for(head).objective, ObjectiveContext(model, tokenizer, data.label_names, data.train, head, device, recipe.seed, model_name=recipe.model.name))

    def save(run_dir: Path, trained: torch.nn.Module) -> Path:
        if head.type == "embedding":
            return save_embedding_final(run_dir, trained, tokenizer, base=recipe.model.name, method=recipe.method)
        return save_final(run_dir, trained, tokenizer, base=recipe.model.name, model_task=plan.model_task, section=recipe.method, label_names=label_names)

    collate = head_collate(head, masking(recipe.objective), tokenizer, recipe.seed)
    return Prepared(model, tokenizer, loaded.source, data, objective, collate, save, recipe.train, model_task=plan.model_task)


def build_head_model(recipe: Recipe, head: HeadConfig, data: DataBundle, loaded: Any) -> tuple[torch.nn.Module, list[str] | None]:
    """The model with ``head`` sized to the data and the recipe's methods applied; its output names."""
    plan = plan_for(head)
    label_names = head_label_names(head, data.label_names)
    kwargs = model_kwargs(head, label_names)
    if kwargs:  # the head's size is known only now that the data is read
        loaded = load_starting_point(recipe, plan.model_task, **kwargs)
    model = apply_methods(loaded.model, recipe.method, model_task=plan.model_task, tokenizer_dir=loaded.details.get("directory"), tokenizer=loaded.tokenizer)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(
            f"nothing to train: method.freeze.base is true and a {head.type} head adds no weights",
            hint="set method.freeze.base: false, or add an adapter (method.lora)",
        )
    return model, label_names


