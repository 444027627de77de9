"""Causal language modelling on supervised tokens only.

Logits are computed only at positions whose next token carries loss (``logits_to_keep`` with a
boolean mask), so prompt tokens never pay for the ``hidden × vocab`` projection: on chat SFT data,
where prompts are longer than answers, that is most of the LM-head compute and memory (SmolLM2's
vocabulary is 49,152). Prompt-learning adapters (prompt/prefix tuning) prepend virtual tokens the
mask cannot describe; for them the full logits are computed and the virtual positions dropped.

Packed rows run attention once per example (``tunelab.train.varlen_attention``) on models whose
attention goes through transformers' attention interface, instead of one block-diagonal-masked
attention over the whole row. Models that cannot take packed rows exactly (``packs_exactly``:
BLOOM drops ``position_ids``, BERT attends both ways) get padded batches instead.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.methods.peft_adapters import is_prompt_learning, unwrap_peft
from tunelab.train.objectives.base import ObjectiveContext, Stats, register_objective
from tunelab.train.packing_check import packs_exactly
from tunelab.train.varlen_attention import (
    segment_bounds,
    supports_varlen,
    varlen_attention,
)

IGNORE_INDEX = -100


@dataclass
class SupervisedForward:
    """One model's outputs at a batch's supervised positions (rows: the N picked positions)."""

    logits: torch.Tensor  # [N, vocab]
    targets: torch.Tensor  # [N]
    picked: torch.Tensor  # [B, T-1] bool: position t is picked when token t+1 carries loss
    hidden_states: list[torch.Tensor] | None = None  # [N, width] per layer; index 0 is the embeddings


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(unwrap_peft(model).forward).parameters


class CausalLMObjective:
    """Token-level cross-entropy on positions whose label is not -100."""

    name = "causal_lm"

    def __init__(self, model: torch.nn.Module, *, sliced_logits: bool = True, varlen: bool = True):
        """``sliced_logits``/``varlen`` exist so the benchmark can measure each lever switched off."""
        self.prompt_learning = is_prompt_learning(model)
        self.sliced_logits = sliced_logits and not self.prompt_learning and _accepts_logits_to_keep(model)
        varlen = varlen and not self.prompt_learning and supports_varlen(model)
        packs = not self.prompt_learning and packs_exactly(model, varlen=varlen)
        if not packs and not self.prompt_learning:
            print(f"tunelab: {type(unwrap_peft(model)).__name__} computes packed rows differently from each example alone; training on padded batches", flush=True)
        self.varlen = varlen and packs
        self.collation = "packed" if packs else "padded"

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def _packed_attention(self, batch: dict[str, torch.Tensor]) -> bool:
        return self.varlen and "position_ids" in batch and "attention_mask" not in batch

    def attention_scope(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
        """Per-example attention for a packed ``batch``, for as long as the context lasts.

        The trainer holds it over the backward pass as well: activation checkpointing re-runs
        the forward there, and it must attend exactly as the first forward did.
        """
        return varlen_attention(model) if self._packed_attention(batch) else contextlib.nullcontext()

    def supervised_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [N, vocab], targets [N], picked [B, T-1])`` at the N positions whose next token is
        supervised, computed the cheapest way the model allows (sliced LM head, per-example attention
        on packed rows)."""
        out = self.forward_supervised(model, batch)
        return out.logits, out.targets, out.picked

    def forward_supervised(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, hidden_states: bool = False) -> SupervisedForward:
        """``supervised_logits`` plus, when asked, every layer's hidden states at the same positions.
        Objectives that compare models (distillation, preferences) call this for each model: the
        positions are picked from the labels alone, so the rows line up."""
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        if self._packed_attention(batch):
            inputs["cu_seq_lens_q"] = segment_bounds(batch["position_ids"])
        supervised_next = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t+1
        targets = labels[:, 1:][supervised_next]
        with self.attention_scope(model, batch):
            if self.sliced_logits:
                keep = torch.zeros_like(labels, dtype=torch.bool)
                keep[:, :-1] = supervised_next
                out = model(**inputs, logits_to_keep=keep, use_cache=False, output_hidden_states=hidden_states)
                logits = out.logits.reshape(-1, out.logits.shape[-1])
            else:
                out = model(**inputs, use_cache=False, output_hidden_states=hidden_states)
                full = out.logits[:, -labels.shape[1] :]  # drop virtual-token positions of prompt learning
                logits = full[:, :-1][supervised_next]
        states = None
        if hidden_states:
            states = [h[:, -labels.shape[1] :][:, :-1][supervised_next] for h in out.hidden_states]
        return SupervisedForward(logits, targets, supervised_next, states)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        logits, targets, supervised_next = self.supervised_logits(model, batch)
        per_token = F.cross_entropy(logits.float(), targets, reduction="none")
        weights = batch.get("weights")  # data.weight_column: each token weighs as its example
        loss_sum = per_token.sum() if weights is None else (per_token * weights[:, 1:][supervised_next]).sum()
        correct = (logits.argmax(-1) == targets).sum()
        return loss_sum, {"loss_sum": loss_sum.detach().item(), "tokens": int(targets.numel()), "correct": int(correct)}

    def summarize(self, stats: Stats) -> dict[str, float]:
        tokens = max(1, stats.get("tokens", 0))
        loss = stats.get("loss_sum", 0.0) / tokens
        return {
            "loss": loss,
            "perplexity": float(torch.exp(torch.tensor(min(loss, 50.0)))),
            "token_accuracy": stats.get("correct", 0) / tokens,
        }


@register_objective("causal_lm", heads=(None,))
def causal_lm(cfg: object, ctx: ObjectiveContext) -> CausalLMObjective:
    return CausalLMObjective(ctx.model)
