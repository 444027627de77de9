"""From a recipe to what the trainer needs: model, data, objective, collation and how to save.

The training stage (``run``) stays one straight line because every task shape is decided here:
no head (causal LM: SFT, or continued pretraining on ``text`` rows), one head
(``method.head``, see ``tunelab.methods.heads``), or several tasks over one body
(``method.tasks``, see ``tunelab.train.multitask``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.data import (
    DataBundle,
    Example,
    build_datasets,
    collate_packed,
    collate_padded,
)
from tunelab.data.collate_tasks import collate_task_batch
from tunelab.data.masking import MaskingCollate
from tunelab.errors import UserError
from tunelab.methods import apply_methods
from tunelab.methods.config import HeadConfig
from tunelab.methods.heads import (
    attach_embedding_head,
    check_model_fits,
    head_label_names,
    model_kwargs,
    plan_for,
)
from tunelab.models import load_model
from tunelab.models.load import model_kind, peek_config
from tunelab.recipe import Recipe
from tunelab.train.artifacts import save_final
from tunelab.train.config import TrainConfig
from tunelab.train.embedding_artifacts import save_embedding_final
from tunelab.train.objectives import OBJECTIVES, Objective

Collate = Callable[[list[Example]], dict[str, torch.Tensor]]


@dataclass
class Prepared:
    """Everything the trainer and the final save need for one run."""

    model: torch.nn.Module
    tokenizer: Any
    source: str
    data: DataBundle
    objective: Objective
    collate: Collate
    save: Callable[[Path], Path]  # writes RUN_DIR/final, returns it
    train_cfg: TrainConfig


def prepare(recipe: Recipe) -> Prepared:
    """Load, prepare and wire up the run ``recipe`` describes."""
    if recipe.method.tasks:
        from tunelab.train.multitask import prepare_multitask

        return prepare_multitask(recipe)
    if recipe.method.head is None:
        return _prepare_causal_lm(recipe)
    return _prepare_head(recipe, recipe.method.head)


def _prepare_causal_lm(recipe: Recipe) -> Prepared:
    loaded = load_model(recipe.model.name, "causal-lm", tokenizer=recipe.model.tokenizer, seed=recipe.seed, attn_implementation=recipe.model.attn_implementation)
    tokenizer = loaded.tokenizer
    data = build_datasets(recipe.data, tokenizer, task="text" if recipe.data.format == "text" else "sft", seed=recipe.seed)
    model = apply_methods(loaded.model, recipe.method, task="causal-lm", tokenizer_dir=loaded.details.get("directory"))
    objective = OBJECTIVES["causal_lm"](model, label_names=data.label_names, train=data.train)
    pad_id = pad_token_id(tokenizer)
    packed = objective.collation == "packed" and recipe.data.packing
    collate = collate_packed if packed else (lambda examples: collate_padded(examples, pad_id))

    def save(run_dir: Path) -> Path:
        return save_final(run_dir, model, tokenizer, base=recipe.model.name, task="causal-lm", method=recipe.method, label_names=data.label_names)

    return Prepared(model, tokenizer, loaded.source, data, objective, collate, save, recipe.train)


def _prepare_head(recipe: Recipe, head: HeadConfig) -> Prepared:
    plan = plan_for(head)
    check_model_fits(head, peek_config(recipe.model.name))
    loaded = load_model(recipe.model.name, plan.model_task, tokenizer=recipe.model.tokenizer, seed=recipe.seed, attn_implementation=recipe.model.attn_implementation)
    data = build_datasets(recipe.data, loaded.tokenizer, task=plan.data_task, seed=recipe.seed)  # type: ignore[arg-type]
    model, label_names = build_head_model(recipe, head, data, loaded)
    objective = OBJECTIVES[plan.objective](model, label_names=data.label_names, head=head, train=data.train)
    tokenizer = loaded.tokenizer

    def save(run_dir: Path) -> Path:
        if head.type == "embedding":
            return save_embedding_final(run_dir, model, tokenizer, base=recipe.model.name, method=recipe.method)
        return save_final(run_dir, model, tokenizer, base=recipe.model.name, task=plan.model_task, method=recipe.method, label_names=label_names)

    return Prepared(model, tokenizer, loaded.source, data, objective, head_collate(head, tokenizer, recipe.seed), save, recipe.train)


def build_head_model(recipe: Recipe, head: HeadConfig, data: DataBundle, loaded: Any) -> tuple[torch.nn.Module, list[str] | None]:
    """The model with ``head`` sized to the data and the recipe's methods applied; its output names."""
    plan = plan_for(head)
    label_names = head_label_names(head, data.label_names)
    kwargs = model_kwargs(head, label_names)
    if kwargs:  # the head's size is known only now that the data is read
        loaded = load_model(recipe.model.name, plan.model_task, tokenizer=recipe.model.tokenizer, seed=recipe.seed, attn_implementation=recipe.model.attn_implementation, **kwargs)
    model = apply_methods(loaded.model, recipe.method, task=plan.model_task, tokenizer_dir=loaded.details.get("directory"))
    if head.type == "embedding":
        model = attach_embedding_head(model, head, model_kind(loaded.model.config) == "encoder")
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(
            f"nothing to train: method.head.base is frozen and a {head.type} head adds no weights",
            hint="set method.head.base: full, or add an adapter (method.lora)",
        )
    return model, label_names


def head_collate(head: HeadConfig, tokenizer: Any, seed: int) -> Collate:
    """Batches for ``head``: masked for masked LM, padded with task tensors otherwise."""
    pad_id = pad_token_id(tokenizer)
    if head.type == "masked_lm":
        if tokenizer.mask_token_id is None:
            raise UserError("the tokenizer has no mask token, so masked LM cannot train", hint="use an encoder model such as minilm-l6")
        return MaskingCollate(
            pad_id=pad_id, mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer), special_ids=frozenset(tokenizer.all_special_ids),
            rate=head.loss.mask_rate, whole_word=head.loss.whole_word, seed=seed,
        )
    return lambda examples: collate_task_batch(examples, pad_id)


def pad_token_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
