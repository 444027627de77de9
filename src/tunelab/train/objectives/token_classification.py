"""Token classification (tagging): one label per word, read at the word's first sub-token."""

from __future__ import annotations

import torch

from tunelab.data import IGNORE_INDEX
from tunelab.train.objectives.base import ObjectiveContext, Stats, register_objective
from tunelab.train.objectives.classification import class_counts, label_metrics
from tunelab.train.objectives.config import WeightedCrossEntropyConfig
from tunelab.train.objectives.losses import class_weight_vector, weighted_cross_entropy


class TokenClassificationObjective:
    """Cross-entropy per labelled token (class weights, smoothing, focal term and the example's
    weight apply per token); token accuracy, macro-F1 and per-tag recall."""

    name = "token_classification"
    collation = "padded"

    def __init__(self, label_names: list[str], loss: WeightedCrossEntropyConfig, class_weights: torch.Tensor | None):
        self.label_names = label_names
        self.loss = loss
        self.class_weights = class_weights

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labelled = batch["labels"] != IGNORE_INDEX
        targets = batch["labels"][labelled]
        per_token = weighted_cross_entropy(
            logits[labelled], targets, class_weights=self.class_weights,
            label_smoothing=self.loss.label_smoothing, focal_gamma=self.loss.focal_gamma,
        )
        weights = batch["weights"].unsqueeze(1).expand_as(labelled)[labelled] if "weights" in batch else 1.0
        loss_sum = (per_token * weights).sum()
        return loss_sum, {
            "loss_sum": loss_sum.detach().item(),
            "examples": int(targets.numel()),
            "predictions": logits[labelled].argmax(-1).detach(),
            "targets": targets.detach(),
        }

    def summarize(self, stats: Stats) -> dict[str, float]:
        return label_metrics(stats, self.label_names)


@register_objective("token_classification", WeightedCrossEntropyConfig, heads=("token_classification",))
def token_classification(cfg: WeightedCrossEntropyConfig, ctx: ObjectiveContext) -> TokenClassificationObjective:
    names = ctx.label_names or []
    return TokenClassificationObjective(names, cfg, class_weight_vector(cfg.class_weights, names, class_counts(ctx.train)))
