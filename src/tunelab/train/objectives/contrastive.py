"""Contrastive embedding objectives over an ``Embedder`` (``tunelab.methods.pooling``).

- ``infonce``: (anchor, positive[, hard negative]) rows; each anchor must pick its positive among
  every positive and hard negative in the batch (in-batch negatives), at a temperature.
- ``simcse``: unsupervised SimCSE (Gao et al. 2021): two forward passes of the same texts differ
  only by dropout, and each text must pick its own second view among the batch's.
- ``triplet``: margin loss on cosine distance with the row's hard negative, or the hardest
  in-batch negative when the row has none.

In-batch negatives make a row's loss depend on its micro-batch, so, unlike token losses, these
are exact under gradient accumulation only when ``grad_accum`` is 1 (the batch is the micro-batch).

Evaluation reports retrieval over the whole validation split: each anchor ranks every
validation positive (recall@k, MRR).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tunelab.train.objectives.base import ObjectiveContext, Stats, register_objective
from tunelab.train.objectives.config import InfoNCEConfig, SimCSEConfig, TripletConfig
from tunelab.train.objectives.losses import (
    hardest_negatives,
    info_nce,
    triplet_margin,
    weighted_sum,
)
from tunelab.train.objectives.retrieval import retrieval_metrics


def embed_group(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``[B, G, D]`` of every sequence of a grouped batch, and the ``[B, G]`` slot mask."""
    mask = batch["group_mask"]
    flat = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return flat.reshape(*mask.shape, -1), mask


class ContrastiveObjective:
    """One of infonce / simcse / triplet (``objective: {name: ...}``)."""

    collation = "padded"

    def __init__(self, name: str, loss: InfoNCEConfig | SimCSEConfig | TripletConfig):
        self.name = name
        self.loss = loss

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["weights"].shape[0])

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        if self.name == "simcse":
            anchors = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            positives = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return self._summed(info_nce(anchors, positives, self.loss.temperature), anchors, positives, batch)
        return self.group_loss(*embed_group(model, batch), batch)

    def group_loss(self, embedded: torch.Tensor, mask: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        """The loss of (anchor, positive[, negative]) rows already embedded (``embed_group``), for
        objectives that reuse the embeddings (distillation)."""
        anchors, positives = embedded[:, 0], embedded[:, 1]
        has_negative = mask[:, 2] if mask.shape[1] > 2 else torch.zeros_like(mask[:, 0])
        if self.name == "infonce":
            candidates = torch.cat([positives, embedded[:, 2][has_negative]]) if has_negative.any() else positives
            per_row = info_nce(anchors, candidates, self.loss.temperature)
        else:
            negatives = hardest_negatives(anchors, positives)
            if has_negative.any():
                negatives = torch.where(has_negative.unsqueeze(-1), embedded[:, 2], negatives)
            per_row = triplet_margin(anchors, positives, negatives, self.loss.margin)
        return self._summed(per_row, anchors, positives, batch)

    @staticmethod
    def _summed(per_row: torch.Tensor, anchors: torch.Tensor, positives: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        loss_sum = weighted_sum(per_row, batch)
        return loss_sum, {
            "loss_sum": loss_sum.detach().item(),
            "examples": int(per_row.shape[0]),
            "anchors": list(anchors.detach().float().cpu()),
            "positives": list(positives.detach().float().cpu()),
        }

    def summarize(self, stats: Stats) -> dict[str, float]:
        metrics = {"loss": stats.get("loss_sum", 0.0) / max(1, stats.get("examples", 0))}
        if self.name != "simcse" and len(stats.get("anchors", [])) > 1:
            metrics.update(retrieval_metrics(torch.stack(stats["anchors"]), torch.stack(stats["positives"])))
        return metrics


def _builder(name: str) -> Callable[[InfoNCEConfig | SimCSEConfig | TripletConfig, ObjectiveContext], ContrastiveObjective]:
    return lambda cfg, ctx: ContrastiveObjective(name, cfg)


for _name, _config in (("infonce", InfoNCEConfig), ("simcse", SimCSEConfig), ("triplet", TripletConfig)):
    register_objective(_name, _config, heads=("embedding",))(_builder(_name))
