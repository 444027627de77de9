"""Task heads: which transformers model class, data task and objective each head type needs.

A head is chosen by ``method.head.type``; everything downstream (model loading, data building,
the objective, saving) asks ``plan_for`` instead of branching on the type itself, so a new head is
one more row in ``PLANS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import UserError
from tunelab.methods.base import Method, MethodContext, register_method
from tunelab.methods.config import HeadConfig
from tunelab.methods.peft_adapters import is_peft_model, unwrap_peft
from tunelab.methods.pooling import Embedder, default_pooling
from tunelab.models.kinds import model_kind

HEAD_WEIGHTS = "head.safetensors"
#: What runs saved before heads were a method plug-in wrote their head weights into.
LEGACY_HEAD_WEIGHTS = "trainable.safetensors"

SCORE_LABEL = "score"  # the one output of a regression or choice-scoring head


@dataclass(frozen=True)
class HeadPlan:
    """What one head type needs: the ``load_model`` task, the data task and the objective name."""

    model_task: str
    example_shape: str
    objective: str
    labelled: bool  # the output size is the number of labels in the data


PLANS = {
    "classification": HeadPlan("sequence-classification", "classification", "classification", True),
    "multi_label": HeadPlan("sequence-classification", "multi_label", "multi_label", True),
    "regression": HeadPlan("sequence-classification", "regression", "regression", False),
    "token_classification": HeadPlan("token-classification", "token_classification", "token_classification", True),
    "multiple_choice": HeadPlan("sequence-classification", "multiple_choice", "multiple_choice", False),
    "masked_lm": HeadPlan("masked-lm", "sentences", "masked_lm", False),
}


#: Embedding heads read single sentences for these objectives and (anchor, positive[, negative]) rows otherwise.
SENTENCE_OBJECTIVES = ("simcse",)


def plan_for(head: HeadConfig, objective: str | None = None) -> HeadPlan:
    """The plan of ``head``; ``objective`` (the recipe's choice, else the head's default) decides
    an embedding head's rows: single sentences for SimCSE, pairs for InfoNCE and triplets."""
    if head.type == "embedding":
        chosen = objective or "infonce"
        return HeadPlan("base", "sentences" if chosen in SENTENCE_OBJECTIVES else "pairs", chosen, False)
    plan = PLANS[head.type]
    return plan if objective is None else HeadPlan(plan.model_task, plan.example_shape, objective, plan.labelled)


def head_label_names(head: HeadConfig, data_labels: list[str] | None) -> list[str] | None:
    """Output names of the head: the data's labels, or one score (regression, multiple choice)."""
    plan = plan_for(head)
    if plan.labelled:
        return data_labels
    return [SCORE_LABEL] if plan.model_task == "sequence-classification" else None


def model_kwargs(head: HeadConfig, label_names: list[str] | None) -> dict[str, object]:
    """``from_pretrained`` arguments that size and describe the head."""
    if plan_for(head).model_task not in ("sequence-classification", "token-classification"):
        return {}
    names = label_names or []
    num_labels = head.num_labels or len(names)
    if head.num_labels and names and head.num_labels != len(names):
        raise UserError(f"method.head.num_labels is {head.num_labels} but the data has {len(names)} labels", hint="remove num_labels or fix data.labels")
    problem = {"multi_label": "multi_label_classification", "regression": "regression"}.get(head.type, "single_label_classification")
    return {
        "num_labels": num_labels,
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
        "problem_type": problem,
    }


def check_model_fits(head: HeadConfig, config: object) -> None:
    """Refuse heads the architecture cannot have (masked LM needs a bidirectional encoder)."""
    if head.type == "masked_lm" and model_kind(config) != "encoder":
        raise UserError(
            "method.head.type masked_lm needs an encoder (BERT-style) model",
            hint="for decoders, continue pretraining with causal LM: no head and data.format: text",
        )


def attach_embedding_head(body: torch.nn.Module, head: HeadConfig, is_encoder: bool) -> Embedder:
    """Wrap a prepared body (methods already applied) in the pooling/projection/normalisation head."""
    return Embedder(body, head.pooling or default_pooling(is_encoder), head.projection, head.normalize)


def head_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules a task head adds: an embedding head's projection, or what a transformers task
    model holds outside its body (``base_model_prefix``: the score/classifier head)."""
    if isinstance(model, Embedder):
        return [model.projection] if model.projection is not None else []
    inner = unwrap_peft(model)
    if inner.get_output_embeddings() is not None:  # a language-model head is pretrained, not added
        return []
    body = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if body is None or body is inner:
        return []
    body_ids = {id(m) for m in body.modules()}
    return [child for _, child in inner.named_children() if id(child) not in body_ids]


@register_method
class HeadMethod(Method):
    """A task head: the model class is chosen at load (``plan_for``); this method wraps embedding
    heads and keeps the head trainable whatever ``method.freeze`` froze."""

    key = "head"
    Config = HeadConfig
    order = 60

    def apply(self, model: torch.nn.Module, cfg: HeadConfig, ctx: MethodContext) -> torch.nn.Module:
        if cfg.type == "embedding":
            return attach_embedding_head(model, cfg, model_kind(model.config) == "encoder")
        if not is_peft_model(model):  # peft trains its own copy of the head (modules_to_save)
            for module in head_modules(model):
                module.requires_grad_(True)
        return model

    def added_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return head_modules(model)

    def save(self, model: torch.nn.Module, cfg: Any, directory: Path) -> list[str]:
        ids = {id(p) for module in head_modules(model) for p in module.parameters()}
        weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if id(p) in ids}
        if not weights:
            return []
        save_file(weights, str(directory / HEAD_WEIGHTS))
        return [HEAD_WEIGHTS]

    def load(self, model: torch.nn.Module, cfg: Any, directory: Path, ctx: MethodContext) -> torch.nn.Module:
        path = next((directory / n for n in (HEAD_WEIGHTS, LEGACY_HEAD_WEIGHTS) if (directory / n).exists()), None)
        if path is None:
            return model
        weights = load_file(str(path))
        missing = set(weights) - {n for n, _ in model.named_parameters()}
        if missing:
            raise UserError(f"trained head weights do not fit the rebuilt model: {sorted(missing)[:2]}", where=str(path))
        model.load_state_dict(weights, strict=False)
        return model
