"""The model a run starts from: a base model, or a trained run (the previous stage of a
multi-stage recipe, or any run directory named as ``model.name``).

A trained run carries its methods (a peft wrapper, a head, projector weights). Training on top
of it merges what they added into the weights first, so the new run's methods wrap a plain model
and the run's final model is "the earlier run's merged model + this run's methods", exactly what
loading it back rebuilds (``tunelab.models.trained``).
"""

from __future__ import annotations

from typing import Any

from tunelab.methods.artifacts import merge_methods
from tunelab.models import load_model
from tunelab.models.load import LoadedModel
from tunelab.recipe import Recipe


def load_starting_point(recipe: Recipe, model_task: str, **model_kwargs: Any) -> LoadedModel:
    """``recipe.model`` loaded as ``model_task``; from a run directory, with its methods merged
    and every weight trainable again (the run's own methods then freeze what they keep fixed)."""
    model = recipe.model
    loaded = load_model(model.name, model_task, tokenizer=model.tokenizer, seed=recipe.seed, attn_implementation=model.attn_implementation, **model_kwargs)  # type: ignore[arg-type]
    if "run_dir" in loaded.details:
        loaded.model = merge_methods(loaded.model).requires_grad_(True)
    return loaded
