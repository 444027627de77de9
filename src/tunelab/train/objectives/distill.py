"""Distillation objectives: a student learns from a frozen teacher's outputs as well as (or
instead of) the hard labels.

- ``kd_logits``: the teacher's next-token distributions at temperature T (forward KL, reverse KL
  or Jensen-Shannon; optionally only the teacher's top-k tokens), at supervised positions only.
- ``kd_hints``: the same plus FitNets-style hints: chosen student hidden states pulled towards the
  teacher's (MSE or cosine), through a learned projection when the widths differ.

Both add ``hard_label_weight`` × the ordinary cross-entropy, so ``kd_weight: 0`` is plain SFT and
``hard_label_weight: 0`` is pure distillation. Every term is summed over supervised tokens, the
unit the trainer normalises by, so the weights mean the same at any batch size.

The teacher is any model tunelab loads (alias, directory, GGUF, a fine-tuned run directory) and
defaults to ``model.name``: the model a student built by ``method.student`` came from. It must
share the student's tokenizer: distributions over different vocabularies are not comparable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tunelab.config_base import Section
from tunelab.data import Example, collate_packed, collate_padded
from tunelab.distill.losses import hint_loss, logit_kd, sparse_logit_kd
from tunelab.distill.teacher_cache import TeacherCache
from tunelab.errors import UserError
from tunelab.methods.peft_adapters import merge_adapters
from tunelab.models.cache import model_fingerprint
from tunelab.train.objectives.base import ObjectiveContext, Stats, register_objective
from tunelab.train.objectives.causal_lm import CausalLMObjective, SupervisedForward

HintLayers = Literal["uniform", "last"] | list[tuple[int, int]]
#: Sums per-token losses, weighting each token as its example (``data.weight_column``).
Summed = Callable[[torch.Tensor], torch.Tensor]


class KDLogitsConfig(Section):
    """Logit distillation (``objective.name: kd_logits``)."""

    teacher: str | None = Field(None, description="The teacher: an alias, HF directory, GGUF or run directory; default: model.name.")
    temperature: float = Field(2.0, gt=0, description="Softens both distributions; the loss is scaled by T² (Hinton et al.).")
    divergence: Literal["forward", "reverse", "js"] = Field(
        "forward", description="forward: KL(teacher‖student), classic KD; reverse: KL(student‖teacher), mode-seeking; js: Jensen-Shannon."
    )
    top_k: int | None = Field(None, gt=0, description="Keep only the teacher's k most likely tokens per position (renormalised).")
    cache: bool = Field(
        False, description="Compute the teacher's top_k logits for the training examples once, into the tunelab cache; "
        "later epochs, resumes and other students read them instead of running the teacher.",
    )
    kd_weight: float = Field(0.5, ge=0, description="Weight of the distillation term.")
    hard_label_weight: float = Field(0.5, ge=0, description="Weight of the ordinary cross-entropy on the data's answers.")


class KDHintsConfig(KDLogitsConfig):
    """Logit distillation plus hidden-state hints (``objective.name: kd_hints``; hints need the live
    teacher's hidden states, so no ``cache``)."""

    hint_weight: float = Field(1.0, ge=0, description="Weight of the hidden-state term.")
    layers: HintLayers = Field(
        "uniform",
        description="Which student layer learns from which teacher layer: uniform (student layer i of n <- teacher layer "
        "round(i·N/n)), last, or explicit [[student, teacher], ...] (1-based; 0 is the embeddings).",
    )
    hint_loss: Literal["mse", "cosine"] = Field("mse", description="Distance between the (projected) student and teacher states.")


class KDSequenceConfig(Section):
    """Sequence-level distillation (``objective.name: kd_sequence``): plain SFT on the teacher's answers."""

    teacher: str | None = Field(None, description="The teacher: an alias, HF directory, GGUF or run directory; default: model.name.")
    max_new_tokens: int = Field(64, gt=0, description="Longest teacher answer (greedy decoding).")
    batch_size: int = Field(8, gt=0, description="Prompts the teacher answers at once.")


class LogitDistillation:
    """``hard_label_weight`` × cross-entropy + ``kd_weight`` × divergence from the teacher."""

    name = "kd_logits"

    def __init__(self, cfg: KDLogitsConfig, student: torch.nn.Module, teacher: torch.nn.Module):
        self.cfg = cfg
        self.student_view = CausalLMObjective(student)
        self.teacher_view = CausalLMObjective(teacher)
        self.teacher = teacher
        self.collation = "packed" if self.student_view.collation == self.teacher_view.collation == "packed" else "padded"
        self.trainable_modules = torch.nn.ModuleDict()  # the objective's own trainable parts (hint projections)
        self.cache: TeacherCache | None = None

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return self.student_view.units(batch)

    def attention_scope(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
        return self.student_view.attention_scope(model, batch)

    def _hidden_states_needed(self) -> bool:
        return False

    def teacher_outputs(self, batch: dict[str, torch.Tensor]) -> SupervisedForward:
        """The teacher's logits (and hidden states, for hints) at the batch's supervised positions."""
        with torch.no_grad():
            return self.teacher_view.forward_supervised(self.teacher, batch, hidden_states=self._hidden_states_needed())

    def student_outputs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> SupervisedForward:
        """The student's logits (and hidden states, for hints) at the batch's supervised positions."""
        return self.student_view.forward_supervised(model, batch, hidden_states=self._hidden_states_needed())

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        student = self.student_outputs(model, batch)
        summed = token_summer(batch, student)
        ce = summed(F.cross_entropy(student.logits.float(), student.targets, reduction="none"))
        kd_name, kd, teacher = self.distillation_term(model, batch, student, summed)
        loss = self.cfg.hard_label_weight * ce + self.cfg.kd_weight * kd
        stats = {
            "loss_sum": float(loss.detach()), "ce_sum": float(ce.detach()), f"{kd_name}_sum": float(kd.detach()),
            "tokens": int(student.targets.numel()), "correct": int((student.logits.argmax(-1) == student.targets).sum()),
        }
        extra = self.extra_terms(student, teacher, summed, batch)
        for key, (weight, value) in extra.items():
            loss = loss + weight * value
            stats["loss_sum"] += weight * float(value.detach())
            stats[f"{key}_sum"] = float(value.detach())
        return loss, stats

    def distillation_term(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], student: SupervisedForward, summed: Summed
    ) -> tuple[str, torch.Tensor, SupervisedForward | None]:
        """``(name, summed divergence, the teacher's outputs when it ran)`` at the batch's supervised
        positions, from the teacher cache when it holds the batch, else from the live teacher."""
        cached = self.cache.lookup(batch) if self.cache is not None else None
        if cached is not None:
            return "kd", summed(sparse_logit_kd(student.logits, *cached, temperature=self.cfg.temperature, divergence=self.cfg.divergence)), None
        teacher = self.teacher_outputs(batch)
        per_token = logit_kd(student.logits, teacher.logits, temperature=self.cfg.temperature, divergence=self.cfg.divergence, top_k=self.cfg.top_k)
        return "kd", summed(per_token), teacher

    def extra_terms(
        self, student: SupervisedForward, teacher: SupervisedForward | None, summed: Summed, batch: dict[str, torch.Tensor]
    ) -> dict[str, tuple[float, torch.Tensor]]:
        """Further weighted terms (name -> (weight, summed loss)); none for logits alone."""
        return {}

    def summarize(self, stats: Stats) -> dict[str, float]:
        tokens = max(1, stats.get("tokens", 0))
        out = {key[: -len("_sum")]: value / tokens for key, value in stats.items() if key.endswith("_sum")}
        out["perplexity"] = float(torch.exp(torch.tensor(min(out.get("ce", 0.0), 50.0))))
        out["token_accuracy"] = stats.get("correct", 0) / tokens
        return out


class HintDistillation(LogitDistillation):
    """Logit distillation plus hidden-state hints at the supervised positions."""

    name = "kd_hints"

    def __init__(self, cfg: KDHintsConfig, student: torch.nn.Module, teacher: torch.nn.Module):
        super().__init__(cfg, student, teacher)
        self.pairs = layer_pairs(cfg.layers, depth(student), depth(teacher))
        student_width, teacher_width = _width(student), _width(teacher)
        if student_width != teacher_width:  # FitNets' regressor: the student's states mapped into the teacher's width
            for s, _ in self.pairs:
                self.trainable_modules[f"hint_{s}"] = torch.nn.Linear(student_width, teacher_width, bias=False)

    def _hidden_states_needed(self) -> bool:
        return True

    def extra_terms(
        self, student: SupervisedForward, teacher: SupervisedForward | None, summed: Summed, batch: dict[str, torch.Tensor]
    ) -> dict[str, tuple[float, torch.Tensor]]:
        assert student.hidden_states is not None and teacher is not None and teacher.hidden_states is not None
        per_token = 0
        for s, t in self.pairs:
            state = student.hidden_states[s]
            if f"hint_{s}" in self.trainable_modules:
                state = self.trainable_modules[f"hint_{s}"](state)
            per_token = per_token + hint_loss(state, teacher.hidden_states[t], self.cfg.hint_loss)  # type: ignore[attr-defined]
        return {"hint": (self.cfg.hint_weight, summed(per_token / len(self.pairs)))}  # type: ignore[attr-defined]


def token_summer(batch: dict[str, torch.Tensor], outputs: SupervisedForward) -> Summed:
    """Sums per-token losses at ``outputs``' positions, each token weighted as its example (``data.weight_column``)."""
    weights = batch.get("weights")
    token_weights = weights[:, 1:][outputs.picked] if weights is not None else None

    def summed(per_token: torch.Tensor) -> torch.Tensor:
        return per_token.sum() if token_weights is None else (per_token * token_weights).sum()

    return summed


def layer_pairs(layers: HintLayers, student_depth: int, teacher_depth: int) -> list[tuple[int, int]]:
    """``(student, teacher)`` hidden-state indices (0: embeddings, i: after block i)."""
    if layers == "last":
        return [(student_depth, teacher_depth)]
    if layers == "uniform":
        return [(i, round(i * teacher_depth / student_depth)) for i in range(1, student_depth + 1)]
    for s, t in layers:
        if not (0 <= s <= student_depth and 0 <= t <= teacher_depth):
            raise UserError(
                f"hint pair [{s}, {t}] is out of range: the student has layers 0..{student_depth}, the teacher 0..{teacher_depth}",
                where="objective.layers",
            )
    return [(int(s), int(t)) for s, t in layers]


def _config(model: torch.nn.Module) -> Any:
    from tunelab.methods.peft_adapters import unwrap_peft

    return unwrap_peft(model).config


def depth(model: torch.nn.Module) -> int:
    config = _config(model)
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


def _width(model: torch.nn.Module) -> int:
    config = _config(model)
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def teacher_name(cfg: Any, ctx: ObjectiveContext) -> str:
    """``objective.teacher``, else the model the student was loaded from (``model.name``)."""
    name = cfg.teacher or ctx.model_name
    if name is None:
        raise UserError("distillation needs a teacher", where="objective.teacher", hint="name a model or run directory")
    return name


def same_vocabulary_teacher(cfg: Any, ctx: ObjectiveContext, model_task: str = "causal-lm") -> torch.nn.Module:
    """The frozen teacher, checked to speak the student's vocabulary (distributions and
    embeddings over different tokenizers are not comparable)."""
    name = teacher_name(cfg, ctx)
    teacher = ctx.auxiliary_model(name, model_task)
    teacher_vocab, student_vocab = ctx.auxiliary_tokenizer(name, model_task).get_vocab(), ctx.tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        raise UserError(
            f"the teacher {name!r} has another tokenizer than the student ({len(teacher_vocab)} vs {len(student_vocab)} tokens)",
            where="objective.teacher", hint="distil from a teacher of the same model family (or, for causal LMs, use kd_sequence)",
        )
    return teacher


def teacher_for(cfg: KDLogitsConfig, ctx: ObjectiveContext) -> torch.nn.Module:
    """The causal-LM teacher; a fine-tuned LoRA run merged: one plain forward, not base + adapter."""
    return merge_adapters(same_vocabulary_teacher(cfg, ctx))


def refuse_cache(cfg: KDLogitsConfig, objective: str, why: str) -> None:
    """A clear error when an objective that needs more of the live teacher than its top-k logits is asked to read a cache."""
    if cfg.cache:
        raise UserError(f"{why}: {objective} cannot read a teacher cache", where="objective.cache", hint="remove it, or use kd_logits")


def attach_cache(objective: LogitDistillation, cfg: KDLogitsConfig, ctx: ObjectiveContext) -> None:
    """Read the teacher's top-k logits on the training examples from disk (computing them once)."""
    if cfg.top_k is None:
        raise UserError("a teacher cache stores the teacher's top-k logits", where="objective.cache", hint="set objective.top_k (e.g. 64)")
    pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0

    def compute(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate_packed(examples) if objective.collation == "packed" else collate_padded(examples, pad_id)
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        logits = objective.teacher_outputs(batch).logits
        values, index = logits.float().topk(cfg.top_k, dim=-1)  # type: ignore[arg-type]
        return values.cpu(), index.cpu()

    fingerprint = model_fingerprint(teacher_name(cfg, ctx), ctx.seed)
    objective.cache = TeacherCache.open_or_build(list(ctx.train), cfg.top_k, fingerprint, compute)


@register_objective("kd_logits", KDLogitsConfig, heads=(None,))
def kd_logits(cfg: KDLogitsConfig, ctx: ObjectiveContext) -> LogitDistillation:
    objective = LogitDistillation(cfg, ctx.model, teacher_for(cfg, ctx))
    if cfg.cache:
        attach_cache(objective, cfg, ctx)
    return objective


@register_objective("kd_hints", KDHintsConfig, heads=(None,))
def kd_hints(cfg: KDHintsConfig, ctx: ObjectiveContext) -> HintDistillation:
    refuse_cache(cfg, "kd_hints", "hints need the live teacher's hidden states")
    return HintDistillation(cfg, ctx.model, teacher_for(cfg, ctx))


def _teacher_answers(cfg: KDSequenceConfig, ctx: ObjectiveContext, data: Any) -> Any:
    from tunelab.distill.sequence import teacher_answered_data

    return teacher_answered_data(data, teacher_name=teacher_name(cfg, ctx), ctx=ctx, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)


@register_objective("kd_sequence", KDSequenceConfig, heads=(None,), data=_teacher_answers)
def kd_sequence(cfg: KDSequenceConfig, ctx: ObjectiveContext) -> CausalLMObjective:
    return CausalLMObjective(ctx.model)
