"""Multiple choice: a one-output head scores each (question, choice) sequence; softmax over the choices.

Works on any model with a sequence-classification head (decoders read the last token of each
choice, encoders its CLS), unlike ``AutoModelForMultipleChoice``, which exists for encoders only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.train.objectives.base import ObjectiveContext, Stats, register_objective
from tunelab.train.objectives.losses import weighted_sum


class MultipleChoiceObjective:
    """Cross-entropy over the choices' scores (absent choices masked out); accuracy."""

    name = "multiple_choice"
    collation = "padded"

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        mask = batch["group_mask"]
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().reshape(mask.shape)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        per_example = F.cross_entropy(scores, batch["labels"], reduction="none")
        loss_sum = weighted_sum(per_example, batch)
        correct = int((scores.argmax(-1) == batch["labels"]).sum())
        return loss_sum, {"loss_sum": loss_sum.detach().item(), "examples": int(mask.shape[0]), "correct": correct}

    def summarize(self, stats: Stats) -> dict[str, float]:
        examples = max(1, stats.get("examples", 0))
        return {"loss": stats.get("loss_sum", 0.0) / examples, "accuracy": stats.get("correct", 0) / examples}


@register_objective("multiple_choice", heads=("multiple_choice",))
def multiple_choice(cfg: object, ctx: ObjectiveContext) -> MultipleChoiceObjective:
    return MultipleChoiceObjective()
