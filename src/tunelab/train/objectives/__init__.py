"""Objectives: what the loss is. Importing this package registers the built-in ones."""

from tunelab.train.objectives import (
    causal_lm,
    classification,
    contrastive,
    distill,
    distill_attention,
    distill_embedding,
    distill_on_policy,
    masked_lm,
    meta,
    multi_label,
    multiple_choice,
    preference,
    regression,
    token_classification,
)
from tunelab.train.objectives.base import (
    OBJECTIVES,
    Objective,
    ObjectiveContext,
    accumulate,
    build_objective,
    register_objective,
)

__all__ = ["OBJECTIVES", "Objective", "ObjectiveContext", "accumulate", "build_objective", "register_objective"]
