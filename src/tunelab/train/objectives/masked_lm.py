"""Masked language modelling: predict the masked tokens (``tunelab.data.masking`` picks them).

The self-supervised step for encoders: adapt to a domain's raw text before task fine-tuning.
The batch arrives masked (labels are the original ids at masked positions, -100 elsewhere), so
``units`` is known before the forward pass, as exact loss normalisation needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tunelab.data import IGNORE_INDEX
from tunelab.train.objectives.base import ObjectiveContext, Stats, register_objective
from tunelab.train.objectives.config import MaskedLMConfig


class MaskedLMObjective:
    """Cross-entropy over masked positions; masked-token accuracy and perplexity."""

    name = "masked_lm"
    collation = "padded"

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        masked = batch["labels"] != IGNORE_INDEX
        targets = batch["labels"][masked]
        chosen = logits[masked].float()
        loss_sum = F.cross_entropy(chosen, targets, reduction="sum")
        correct = int((chosen.argmax(-1) == targets).sum())
        return loss_sum, {"loss_sum": loss_sum.detach().item(), "tokens": int(targets.numel()), "correct": correct}

    def summarize(self, stats: Stats) -> dict[str, float]:
        tokens = max(1, stats.get("tokens", 0))
        loss = stats.get("loss_sum", 0.0) / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "masked_accuracy": stats.get("correct", 0) / tokens}


@register_objective("masked_lm", MaskedLMConfig, heads=("masked_lm",))
def masked_lm(cfg: MaskedLMConfig, ctx: ObjectiveContext) -> MaskedLMObjective:
    return MaskedLMObjective()
