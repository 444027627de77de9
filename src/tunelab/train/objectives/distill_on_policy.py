"""On-policy distillation (``objective.name: kd_on_policy``; GKD, Agarwal et al. 2024).

Ordinary KD teaches the student on the data's answers, but at inference it continues its *own*
text, where one early mistake puts it in states it never trained on. On a fraction of the training
batches (``on_policy_fraction``, GKD's λ) the student samples answers to the batch's prompts and
the teacher scores those answers token by token; the divergence between the two on the student's
own tokens is the loss. The other batches are ordinary ``kd_logits`` batches. With ``divergence:
reverse`` (or ``js``) this is the mode-seeking on-policy objective of GKD/MiniLLM.

Which batches go on-policy is decided by a hash of the batch's tokens and the seed: the same run
makes the same choices, and a resumed run makes the choices the uninterrupted one made. Only
training batches go on-policy; validation measures the data's answers. The hard-label term (when
weighted) is still taken on the data's answers, as every batch's student forward computes it.
The metrics report ``kd`` (data batches) and ``kd_on_policy`` separately, each per supervised
token of all batches, so the two add up to the distillation term.
"""

from __future__ import annotations

import hashlib
from functools import partial

import numpy as np
import torch
from pydantic import Field

from tunelab.data import collate_packed, collate_padded
from tunelab.distill.losses import logit_kd
from tunelab.distill.on_policy import answered_batch, batch_prompts, sample_answers
from tunelab.train.objectives.base import ObjectiveContext, register_objective
from tunelab.train.objectives.causal_lm import SupervisedForward
from tunelab.train.objectives.distill import (
    KDLogitsConfig,
    LogitDistillation,
    Summed,
    attach_cache,
    teacher_for,
    token_summer,
)


class KDOnPolicyConfig(KDLogitsConfig):
    """``kd_logits`` plus batches on which the student answers and the teacher scores the answers."""

    on_policy_fraction: float = Field(0.5, ge=0, le=1, description="Share of training batches distilled on the student's own samples (GKD's λ).")
    max_new_tokens: int = Field(32, gt=0, description="Longest sampled answer.")
    sampling_temperature: float = Field(1.0, gt=0, description="Temperature the student samples its answers at.")


class OnPolicyDistillation(LogitDistillation):
    """``kd_logits`` whose divergence is, on some training batches, taken on the student's own answers."""

    name = "kd_on_policy"

    def __init__(self, cfg: KDOnPolicyConfig, student: torch.nn.Module, teacher: torch.nn.Module, *, pad_id: int, end_of_text: int | None, seed: int):
        super().__init__(cfg, student, teacher)
        self.pad_id, self.end_of_text, self.seed = pad_id, end_of_text, seed
        self.collate = collate_packed if self.collation == "packed" else partial(collate_padded, pad_id=pad_id)

    def goes_on_policy(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bool:
        """A seeded, content-determined coin flip with probability ``on_policy_fraction`` (training batches only)."""
        fraction = self.cfg.on_policy_fraction  # type: ignore[attr-defined]
        if not model.training or fraction == 0:
            return False
        digest = hashlib.sha1(np.asarray(batch["input_ids"].cpu()).tobytes() + str(self.seed).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < fraction

    def distillation_term(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], student: SupervisedForward, summed: Summed
    ) -> tuple[str, torch.Tensor, SupervisedForward | None]:
        if not self.goes_on_policy(model, batch):
            return super().distillation_term(model, batch, student, summed)
        cfg: KDOnPolicyConfig = self.cfg  # type: ignore[assignment]
        prompts = batch_prompts(batch)
        answers = sample_answers(
            model, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.sampling_temperature, pad_id=self.pad_id, end_of_text=self.end_of_text
        ) if prompts else []
        sampled = answered_batch(prompts, answers, self.collate)
        if sampled is None:
            return super().distillation_term(model, batch, student, summed)
        own = self.student_outputs(model, sampled)
        teacher = self.teacher_outputs(sampled)
        per_token = logit_kd(own.logits, teacher.logits, temperature=cfg.temperature, divergence=cfg.divergence, top_k=cfg.top_k)
        # mean over the sampled tokens, in the trainer's unit (the batch's supervised tokens)
        scale = student.targets.numel() / max(1, own.targets.numel())
        return "kd_on_policy", token_summer(sampled, own)(per_token) * scale, None


@register_objective("kd_on_policy", KDOnPolicyConfig, heads=(None,))
def kd_on_policy(cfg: KDOnPolicyConfig, ctx: ObjectiveContext) -> OnPolicyDistillation:
    tokenizer = ctx.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    objective = OnPolicyDistillation(cfg, ctx.model, teacher_for(cfg, ctx), pad_id=pad_id, end_of_text=tokenizer.eos_token_id, seed=ctx.seed)
    if cfg.cache:
        attach_cache(objective, cfg, ctx)
    return objective
