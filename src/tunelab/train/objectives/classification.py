"""Single-label sequence classification through a task head (``AutoModelForSequenceClassification``).

The head pools the last non-pad token on decoders and the CLS token on encoders (transformers'
own heads do exactly that), so this objective is only the loss and its metrics. The loss is
cross-entropy with optional class weights (given, or ``auto`` from the training split), label
smoothing, a focal term and per-example weights (``objective:`` settings, ``data.weight_column``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from tunelab.data import Example
from tunelab.train.objectives.base import ObjectiveContext, Stats, register_objective
from tunelab.train.objectives.config import WeightedCrossEntropyConfig
from tunelab.train.objectives.losses import (
    class_weight_vector,
    weighted_cross_entropy,
    weighted_sum,
)


class ClassificationObjective:
    """Weighted/focal/smoothed cross-entropy over class logits; accuracy, macro-F1 and per-class recall."""

    name = "classification"
    collation = "padded"

    def __init__(self, label_names: list[str] | None = None, loss: WeightedCrossEntropyConfig | None = None, class_weights: torch.Tensor | None = None):
        self.label_names = label_names
        self.loss = loss or WeightedCrossEntropyConfig()
        self.class_weights = class_weights

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        per_example = weighted_cross_entropy(
            logits, batch["labels"], class_weights=self.class_weights,
            label_smoothing=self.loss.label_smoothing, focal_gamma=self.loss.focal_gamma,
        )
        loss_sum = weighted_sum(per_example, batch)
        return loss_sum, {
            "loss_sum": loss_sum.detach().item(),
            "examples": int(batch["labels"].shape[0]),
            "predictions": logits.argmax(-1).detach(),
            "targets": batch["labels"].detach(),
        }

    def summarize(self, stats: Stats) -> dict[str, float]:
        return label_metrics(stats, self.label_names)


def label_metrics(stats: Stats, label_names: list[str] | None) -> dict[str, float]:
    """Loss per example, accuracy, macro-F1 and each class's recall (what class weighting is for)."""
    from tunelab.evaluate.metrics import accuracy, f1

    name = (lambda i: label_names[i]) if label_names else str
    predictions = [name(int(p)) for p in stats.get("predictions", [])]
    truth = [name(int(t)) for t in stats.get("targets", [])]
    metrics = {"loss": stats.get("loss_sum", 0.0) / max(1, stats.get("examples", 0))}
    if truth:
        references = [[t] for t in truth]
        metrics["accuracy"] = accuracy(predictions, references)["accuracy"]
        metrics["f1_macro"] = f1(predictions, references)["f1_macro"]
        for label in sorted(set(truth)):
            hits = [p == t for p, t in zip(predictions, truth) if t == label]
            metrics[f"recall_{label}"] = sum(hits) / len(hits)
    return metrics


def class_counts(train: Sequence[Example]) -> Counter[int]:
    """How often each class id occurs in the training split (single labels or token tags)."""
    counts: Counter[int] = Counter()
    for example in train:
        if example.label is not None:
            counts[example.label] += 1
        counts.update(t for t in example.labels if t >= 0)
    return counts


@register_objective("classification", WeightedCrossEntropyConfig, heads=("classification",))
def classification(cfg: WeightedCrossEntropyConfig, ctx: ObjectiveContext) -> ClassificationObjective:
    weights = class_weight_vector(cfg.class_weights, ctx.label_names or [], class_counts(ctx.train))
    return ClassificationObjective(ctx.label_names, cfg, weights)
