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

from typing import Literal

import torch
from pydantic import Field

from tunelab.distill.attention import captured, head_counts, projections
from tunelab.distill.losses import relation_kd, relation_log_probs
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

Relation = Literal["qk", "qq", "kk", "vv"]


class KDAttentionConfig(KDLogitsConfig):
    """Logit distillation plus attention transfer (attention needs the live teacher: no ``cache``)."""

    attention_weight: float = Field(1.0, ge=0, description="Weight of the attention-relation term (KL per token).")
    relations: list[Relation] = Field(
        ["qq", "kk", "vv"], min_length=1,
        description="qk: attention maps (same query-head count as the teacher); qq/kk/vv: query/key/value self-relations (MiniLMv2).",
    )
    relation_heads: int | None = Field(
        None, gt=0, description="Heads the qq/kk/vv relations are split into; default: the student's key/value heads."
    )
    layers: Literal["uniform", "last"] | list[tuple[int, int]] = Field(
        "last", description="Which student block learns from which teacher block: last (MiniLM), uniform, or [[student, teacher], ...] (1-based)."
    )


class AttentionDistillation(LogitDistillation):
    """``kd_logits`` plus KL between the student's and the teacher's attention relations."""

    name = "kd_attention"

    def __init__(self, cfg: KDAttentionConfig, student: torch.nn.Module, teacher: torch.nn.Module):
        super().__init__(cfg, student, teacher)
        if self.student_view.prompt_learning:
            raise UserError("attention transfer cannot line up a student's virtual prompt tokens with the teacher's", where="objective.name")
        self.pairs = layer_pairs(cfg.layers, depth(student), depth(teacher))
        if any(s == 0 or t == 0 for s, t in self.pairs):
            raise UserError("attention pairs name blocks (1-based); 0 is the embeddings, which have no attention", where="objective.layers")
        self.student_modules = {f"{s}.{kind}": m for s, _ in self.pairs for kind, m in projections(student, s).items()}
        self.teacher_modules = {f"{t}.{kind}": m for _, t in self.pairs for kind, m in projections(teacher, t).items()}
        self.student_heads, self.teacher_heads = head_counts(student), head_counts(teacher)
        self.relation_heads = cfg.relation_heads or self.student_heads[1]
        self._check_heads(cfg)
        self.states: dict[str, dict[str, torch.Tensor]] = {}

    def _check_heads(self, cfg: KDAttentionConfig) -> None:
        if "qk" in cfg.relations and self.student_heads[0] != self.teacher_heads[0]:
            raise UserError(
                f"attention maps (qk) are compared head by head: the student has {self.student_heads[0]} heads, the teacher {self.teacher_heads[0]}",
                where="objective.relations", hint="use the qq/kk/vv relations, which any head count can learn",
            )
        kinds = {kind for relation in cfg.relations if relation != "qk" for kind in relation}
        for side, modules in (("student", self.student_modules), ("teacher", self.teacher_modules)):
            for name, module in modules.items():
                width = getattr(module, "out_features", None)
                if name.split(".")[1] in kinds and width is not None and width % self.relation_heads:
                    raise UserError(
                        f"the {side}'s {name.split('.')[1]} projection ({width} wide) does not split into {self.relation_heads} relation heads",
                        where="objective.relation_heads", hint="choose a number that divides every projection's width",
                    )

    def student_outputs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> SupervisedForward:
        with captured(self.student_modules) as store:
            out = super().student_outputs(model, batch)
        self.states["student"] = store
        return out

    def teacher_outputs(self, batch: dict[str, torch.Tensor]) -> SupervisedForward:
        with captured(self.teacher_modules) as store:
            out = super().teacher_outputs(batch)
        self.states["teacher"] = store
        return out

    def _relations(self, side: str, block: int, relation: str, row: int, start: int, end: int) -> torch.Tensor:
        store = self.states[side]
        a, b = (store[f"{block}.{kind}"][row, start:end] for kind in relation)
        heads = (self.student_heads if side == "student" else self.teacher_heads) if relation == "qk" else (self.relation_heads,) * 2
        return relation_log_probs(a, b, *heads, causal=True)

    def extra_terms(
        self, student: SupervisedForward, teacher: SupervisedForward | None, summed: Summed, batch: dict[str, torch.Tensor]
    ) -> dict[str, tuple[float, torch.Tensor]]:
        cfg: KDAttentionConfig = self.cfg  # type: ignore[assignment]
        weights = batch.get("weights")
        total = torch.zeros((), device=student.logits.device)
        tokens = 0
        for row, start, end in segments(batch):
            example = sum(
                relation_kd(self._relations("student", s, relation, row, start, end), self._relations("teacher", t, relation, row, start, end)).sum()
                for s, t in self.pairs for relation in cfg.relations
            )
            total = total + (example if weights is None else example * weights[row, start])
            tokens += end - start
        self.states.clear()
        mean_per_token = total / (max(1, tokens) * len(self.pairs) * len(cfg.relations))
        return {"attention": (cfg.attention_weight, mean_per_token * student.targets.numel())}


@register_objective("kd_attention", KDAttentionConfig, heads=(None,))
def kd_attention(cfg: KDAttentionConfig, ctx: ObjectiveContext) -> AttentionDistillation:
    refuse_cache(cfg, "kd_attention", "attention transfer needs the live teacher's attention")
    return AttentionDistillation(cfg, ctx.model, teacher_for(cfg, ctx))
