"""Attention transfer (``objective.name: kd_attention``): the student's self-attention is pulled
towards the teacher's, on top of logit distillation.

Two kinds of relation, chosen per recipe:

- ``qk``: the attention maps themselves, softmax(QKᵀ/√d) per head (MiniLM); the student needs
  the teacher's number of query heads, as the maps are compared head by head.
- ``qq``, ``kk``, ``vv``: MiniLMv2's self-attention relations, softmax(XXᵀ/√d) of the queries,
  keys or values split into ``relation_heads`` heads of any size: students with other head
  counts or widths can learn them, as long as every projection's width divides evenly.

Each relation is a KL divergence from the teacher's row to the student's, per query position,
averaged over heads, relations and layer pairs, and taken inside each example (never across the
examples of a packed row), with the decoder's causal mask. Attention covers every token, prompt
included, so the mean per token is scaled to the trainer's unit (supervised tokens): the weight
means the same whatever the prompt-to-answer ratio of a batch.
"""

from __future__ import annotations

import torch

from tunelab.distill.attention import AttentionSettings, AttentionTransfer
from tunelab.distill.teacher_cache import segments
from tunelab.errors import UserError
from tunelab.train.objectives.base import ObjectiveContext, register_objective
from tunelab.train.objectives.causal_lm import SupervisedForward
from tunelab.train.objectives.distill import (
    KDLogitsConfig,
    LogitDistillation,
    Summed,
    depth,
    layer_pairs,
    refuse_cache,
    teacher_for,
)


class KDAttentionConfig(KDLogitsConfig, AttentionSettings):
    """Logit distillation plus attention transfer (attention needs the live teacher: no ``cache``)."""


class AttentionDistillation(LogitDistillation):
    """``kd_logits`` plus KL between the student's and the teacher's attention relations."""

    name = "kd_attention"

    def __init__(self, cfg: KDAttentionConfig, student: torch.nn.Module, teacher: torch.nn.Module):
        super().__init__(cfg, student, teacher)
        if self.student_view.prompt_learning:
            raise UserError("attention transfer cannot line up a student's virtual prompt tokens with the teacher's", where="objective.name")
        self.transfer = AttentionTransfer(cfg, student, teacher, layer_pairs(cfg.layers, depth(student), depth(teacher)), causal=True)

    def student_outputs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> SupervisedForward:
        with self.transfer.capturing("student"):
            return super().student_outputs(model, batch)

    def teacher_outputs(self, batch: dict[str, torch.Tensor]) -> SupervisedForward:
        with self.transfer.capturing("teacher"):
            return super().teacher_outputs(batch)

    def extra_terms(
        self, student: SupervisedForward, teacher: SupervisedForward | None, summed: Summed, batch: dict[str, torch.Tensor]
    ) -> dict[str, tuple[float, torch.Tensor]]:
        weights = batch.get("weights")
        total = torch.zeros((), device=student.logits.device)
        tokens = 0
        for row, start, end in segments(batch):
            example = self.transfer.divergence(row, start, end)
            total = total + (example if weights is None else example * weights[row, start])
            tokens += end - start
        self.transfer.release()
        mean_per_token = total / max(1, tokens)
        return {"attention": (self.cfg.attention_weight, mean_per_token * student.targets.numel())}  # type: ignore[attr-defined]


@register_objective("kd_attention", KDAttentionConfig, heads=(None,))
def kd_attention(cfg: KDAttentionConfig, ctx: ObjectiveContext) -> AttentionDistillation:
    refuse_cache(cfg, "kd_attention", "attention transfer needs the live teacher's attention")
    return AttentionDistillation(cfg, ctx.model, teacher_for(cfg, ctx))
