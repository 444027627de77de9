"""Embedding distillation (``objective.name: kd_embedding``): a student encoder learns to place
every text where the teacher's sentence embedding puts it (MSE or cosine on the pooled, projected,
normalised embeddings), optionally with the in-batch contrastive loss on the pairs as well, and
optionally with attention transfer (MiniLM's attention maps or MiniLMv2's query/key/value
relations, ``attention_weight`` > 0), compared text by text, bidirectionally for an encoder.

The teacher is wrapped in the student's own head (same pooling and normalisation; no projection),
so the two embed alike; with ``method.student`` the student is the teacher minus blocks, and the
result is a smaller sentence-transformers model. Validation reports the retrieval metrics of the
contrastive objectives (recall@k, MRR), so a distilled student compares with its teacher directly.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from pydantic import Field

from tunelab.distill.attention import AttentionSettings, AttentionTransfer
from tunelab.distill.losses import hint_loss
from tunelab.errors import UserError
from tunelab.methods.pooling import Embedder, default_pooling
from tunelab.models.kinds import model_kind
from tunelab.train.objectives.base import ObjectiveContext, Stats, register_objective
from tunelab.train.objectives.config import InfoNCEConfig
from tunelab.train.objectives.contrastive import ContrastiveObjective, embed_group
from tunelab.train.objectives.distill import depth, layer_pairs, same_vocabulary_teacher


class KDEmbeddingConfig(AttentionSettings):
    """Sentence-embedding distillation from a teacher encoder."""

    teacher: str | None = Field(None, description="The teacher encoder (alias, directory or run); default: model.name.")
    loss: Literal["mse", "cosine"] = Field("cosine", description="Distance between student and teacher embeddings.")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the distillation term (per text).")
    contrastive_weight: float = Field(0.0, ge=0, description="Weight of InfoNCE on the pairs (0: distillation only).")
    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature (with contrastive_weight).")
    attention_weight: float = Field(0.0, ge=0, description="Weight of attention transfer (KL per token, averaged over a row's texts); 0: off.")


class EmbeddingDistillation:
    """Per row: ``kd_weight`` × mean distance over its texts + ``contrastive_weight`` × InfoNCE."""

    name = "kd_embedding"
    collation = "padded"

    def __init__(self, cfg: KDEmbeddingConfig, student: torch.nn.Module, teacher: Embedder):
        self.cfg = cfg
        self.teacher = teacher
        self.contrastive = ContrastiveObjective("infonce", InfoNCEConfig(temperature=cfg.temperature))
        self.transfer = None
        if cfg.attention_weight > 0:
            pairs = layer_pairs(cfg.layers, depth(student), depth(teacher))
            self.transfer = AttentionTransfer(cfg, student, teacher, pairs, causal=model_kind(teacher.config) != "encoder")

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return self.contrastive.units(batch)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        with self._capturing("student"):
            student, mask = embed_group(model, batch)
        contrastive, stats = self.contrastive.group_loss(student, mask, batch)
        with torch.no_grad(), self._capturing("teacher"):
            teacher, _ = embed_group(self.teacher, batch)
        per_text = hint_loss(student, teacher, self.cfg.loss) * mask
        kd = self._per_row_sum(per_text, mask, batch)
        loss = self.cfg.kd_weight * kd + self.cfg.contrastive_weight * contrastive
        stats.update(kd_sum=float(kd.detach()), infonce_sum=float(contrastive.detach()))
        if self.transfer is not None:
            attention = self._per_row_sum(self._attention_per_text(batch, mask), mask, batch)
            loss = loss + self.cfg.attention_weight * attention
            stats["attention_sum"] = float(attention.detach())
        stats["loss_sum"] = float(loss.detach())
        return loss, stats

    def _capturing(self, side: str) -> contextlib.AbstractContextManager:
        return self.transfer.capturing(side) if self.transfer is not None else contextlib.nullcontext()

    @staticmethod
    def _per_row_sum(per_text: torch.Tensor, mask: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over each row's texts, summed over rows (weighted as the rows): the objective's unit is the row."""
        per_row = per_text.sum(1) / mask.sum(1).clamp(min=1)
        weights = batch.get("weights")
        return (per_row * weights).sum() if weights is not None else per_row.sum()

    def _attention_per_text(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """``[B, G]`` mean attention-relation KL per token of each text (0 for empty slots)."""
        assert self.transfer is not None
        flat_mask = mask.flatten()
        values = []
        for index, tokens in enumerate(batch["attention_mask"]):
            positions = tokens.nonzero().flatten()
            if not flat_mask[index] or positions.numel() == 0:
                values.append(torch.zeros((), device=mask.device))
                continue
            start, end = int(positions[0]), int(positions[-1]) + 1
            values.append(self.transfer.divergence(index, start, end) / (end - start))
        self.transfer.release()
        return torch.stack(values).view(mask.shape) * mask

    def summarize(self, stats: Stats) -> dict[str, float]:
        metrics = self.contrastive.summarize(stats)
        examples = max(1, stats.get("examples", 0))
        metrics.update(kd=stats.get("kd_sum", 0.0) / examples, infonce=stats.get("infonce_sum", 0.0) / examples)
        if "attention_sum" in stats:
            metrics["attention"] = stats["attention_sum"] / examples
        return metrics


@register_objective("kd_embedding", KDEmbeddingConfig, heads=("embedding",))
def kd_embedding(cfg: KDEmbeddingConfig, ctx: ObjectiveContext) -> EmbeddingDistillation:
    body = same_vocabulary_teacher(cfg, ctx, "base")
    head = ctx.head
    teacher = Embedder(body, head.pooling or default_pooling(model_kind(body.config) == "encoder"), None, head.normalize).eval()
    student_width = head.projection or ctx.model.config.hidden_size
    if student_width != body.config.hidden_size:
        raise UserError(
            f"the student embeds in {student_width} dimensions, the teacher in {body.config.hidden_size}",
            where="method.head.projection", hint=f"set method.head.projection: {body.config.hidden_size}, or distil from a teacher of the student's width",
        )
    return EmbeddingDistillation(cfg, ctx.model, teacher)
