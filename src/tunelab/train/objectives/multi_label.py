"""Multi-label classification: each label is its own yes/no decision (sigmoid + binary cross-entropy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.train.objectives.base import ObjectiveContext, Stats, register_objective
from tunelab.train.objectives.config import MultiLabelConfig
from tunelab.train.objectives.losses import weighted_sum


class MultiLabelObjective:
    """BCE summed over labels per example; exact-set accuracy and micro/macro F1 over label decisions."""

    name = "multi_label"
    collation = "padded"

    def __init__(self, label_names: list[str], loss: MultiLabelConfig):
        self.label_names = label_names
        self.threshold = loss.threshold

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["targets"].shape[0])

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        per_example = F.binary_cross_entropy_with_logits(logits, batch["targets"], reduction="none").sum(-1)
        loss_sum = weighted_sum(per_example, batch)
        predicted = (logits.sigmoid() > self.threshold).float()
        return loss_sum, {
            "loss_sum": loss_sum.detach().item(),
            "examples": int(logits.shape[0]),
            "exact": int((predicted == batch["targets"]).all(-1).sum()),
            "tp": (predicted * batch["targets"]).sum(0).detach().tolist(),
            "fp": (predicted * (1 - batch["targets"])).sum(0).detach().tolist(),
            "fn": ((1 - predicted) * batch["targets"]).sum(0).detach().tolist(),
        }

    def summarize(self, stats: Stats) -> dict[str, float]:
        examples = max(1, stats.get("examples", 0))
        k = len(self.label_names)
        tp, fp, fn = ([sum(stats.get(key, [])[i::k]) for i in range(k)] for key in ("tp", "fp", "fn"))
        per_label = [2 * t / (2 * t + p + n) for t, p, n in zip(tp, fp, fn) if t + p + n]
        micro = 2 * sum(tp) / max(1e-9, 2 * sum(tp) + sum(fp) + sum(fn))
        return {
            "loss": stats.get("loss_sum", 0.0) / examples,
            "exact_match": stats.get("exact", 0) / examples,
            "f1_micro": micro,
            "f1_macro": sum(per_label) / len(per_label) if per_label else 0.0,
        }


@register_objective("multi_label", MultiLabelConfig, heads=("multi_label",))
def multi_label(cfg: MultiLabelConfig, ctx: ObjectiveContext) -> MultiLabelObjective:
    return MultiLabelObjective(ctx.label_names or [], cfg)
