"""Regression: one number per text from a one-output head, trained with squared error."""

from __future__ import annotations

import math

import torch

from tunelab.train.objectives.base import ObjectiveContext, Stats, register_objective
from tunelab.train.objectives.losses import weighted_sum


class RegressionObjective:
    """Squared error per example; RMSE, MAE and Pearson correlation at evaluation."""

    name = "regression"
    collation = "padded"

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["targets"].shape[0])

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        predictions = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().reshape(-1)
        targets = batch["targets"].reshape(-1)
        loss_sum = weighted_sum((predictions - targets) ** 2, batch)
        return loss_sum, {"loss_sum": loss_sum.detach().item(), "predictions": predictions.detach(), "targets": targets.detach()}

    def summarize(self, stats: Stats) -> dict[str, float]:
        predictions, targets = stats.get("predictions"), stats.get("targets")
        if predictions is None or not len(predictions):
            return {"loss": 0.0}
        error = predictions - targets
        metrics = {
            "loss": stats.get("loss_sum", 0.0) / len(predictions),
            "rmse": math.sqrt(float((error**2).mean())),
            "mae": float(error.abs().mean()),
        }
        if len(predictions) > 1 and predictions.std() > 0 and targets.std() > 0:
            metrics["pearson"] = float(torch.corrcoef(torch.stack([predictions, targets]))[0, 1])
        return metrics


@register_objective("regression", heads=("regression",))
def regression(cfg: object, ctx: ObjectiveContext) -> RegressionObjective:
    return RegressionObjective()
