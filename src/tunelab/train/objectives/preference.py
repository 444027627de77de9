"""Direct preference optimisation: learn from pairs of answers, one preferred over the other.

DPO (Rafailov et al., 2023) trains the policy π so that its log-likelihood ratio to a frozen
reference model grows more for the chosen answer than for the rejected one. With
``h = [log π(c) − log π_ref(c)] − [log π(r) − log π_ref(r)]`` (log-probabilities summed over the
answer's tokens) the losses are:

- ``sigmoid`` (DPO): ``−log σ(β h)``; with ``label_smoothing`` ε, conservative DPO
  ``−(1−ε) log σ(β h) − ε log σ(−β h)`` for labels that are wrong with probability ε;
- ``ipo`` (Azar et al., 2023): ``(h̄ − 1/(2β))²`` on per-token average log-probabilities, which
  does not push a margin that is already large further;
- ``hinge`` (SLiC): ``max(0, 1 − β h)``.

``sft_weight`` adds that weight times the chosen answer's per-token negative log-likelihood (RPO,
Pang et al., 2024), which keeps the chosen answer's likelihood from falling while the margin grows.

The reference is the model as it was before training. For a model whose only trainable weights
are peft adapters that is the same model with its adapters switched off, so no second copy is
loaded; otherwise (full fine-tuning, layer freezing, tunelab's own adapters) ``model.name`` is
loaded once, frozen. ``reference`` names another model (it must share the tokenizer).

Both answers of every pair go through the policy in one packed row, each pair's prompt held once
(``collate_packed(share_prefix=True, group_size=2)``), so each step is one forward and backward
over the pairs and one gradient-free forward of the reference, neither of which repeats a prompt.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tunelab.config_base import Section
from tunelab.data.collate import example_index
from tunelab.errors import UserError
from tunelab.methods.peft_adapters import unwrap_peft
from tunelab.train.distributed import unwrap as unwrap_ddp
from tunelab.train.objectives.base import ObjectiveContext, Stats, register_objective
from tunelab.train.objectives.causal_lm import CausalLMObjective


class DPOConfig(Section):
    """Preference optimisation on (prompt, chosen, rejected) rows (``objective.name: dpo``)."""

    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference: larger keeps it closer.")
    loss: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="sigmoid: DPO; ipo: squared distance to a target margin; hinge: SLiC.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed rate of wrongly ordered pairs (conservative DPO; sigmoid loss only).")
    sft_weight: float = Field(0.0, ge=0, description="Weight of the chosen answer's per-token NLL added to the loss (RPO); 0: pure DPO.")
    reference: str | None = Field(
        None, description="Reference model (alias, directory, GGUF or run directory); default: the model before training "
        "(adapters switched off for peft adapters, else model.name loaded once).",
    )


@dataclass
class SequenceLogProbs:
    """Summed log-probabilities and supervised-token counts per sequence (``[2 × pairs]``)."""

    summed: torch.Tensor
    tokens: torch.Tensor


def preference_pairs(batch: dict[str, torch.Tensor]) -> int:
    """How many (chosen, rejected) pairs the batch holds."""
    return int(example_index(batch).max()) // 2 + 1


class DPOObjective:
    """The DPO family of pairwise losses, summed over pairs; implicit rewards as statistics."""

    name = "dpo"
    unit_name = "preference pairs"

    def __init__(self, cfg: DPOConfig, model: torch.nn.Module, reference: torch.nn.Module | None):
        """``reference`` None: the policy with its peft adapters switched off is the reference."""
        self.cfg = cfg
        self.policy_view = CausalLMObjective(model, fused_loss=False, shared_prefix=True)
        self.reference = reference
        self.reference_view = self.policy_view if reference is None else CausalLMObjective(reference, fused_loss=False)
        if self.reference_view.collation != self.policy_view.collation:
            raise UserError(
                "the reference model cannot read the policy's packed batches", where="objective.reference",
                hint="use a reference of the same architecture as model.name, or set data.packing: false",
            )
        self.collation = self.policy_view.collation
        self.shared_prefix = self.policy_view.shared_prefix
        self.row_padding = self.policy_view.row_padding and self.reference_view.row_padding
        #: Prefixes are shared within each pair: its two answers follow the same prompt.
        self.prefix_group = 2

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return preference_pairs(batch)

    def attention_scope(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
        return self.policy_view.attention_scope(model, batch)

    def sequence_log_probs(self, view: CausalLMObjective, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                           index: torch.Tensor) -> SequenceLogProbs:
        """Each sequence's answer log-probability under ``model`` (``view`` knows how it reads
        batches; ``index`` is ``example_index(batch)``, computed once per batch)."""
        out = view.forward_supervised(model, batch)
        token_logps = -F.cross_entropy(out.logits.float(), out.targets, reduction="none")
        owner = index[:, 1:][out.picked]  # the sequence of each supervised target token
        sequences = int(index.max()) + 1
        summed = torch.zeros(sequences, dtype=token_logps.dtype).index_add(0, owner, token_logps)
        tokens = torch.zeros(sequences, dtype=token_logps.dtype).index_add(0, owner, torch.ones_like(token_logps))
        return SequenceLogProbs(summed, tokens)

    def reference_log_probs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], index: torch.Tensor) -> SequenceLogProbs:
        with torch.no_grad():
            if self.reference is not None:
                return self.sequence_log_probs(self.reference_view, self.reference, batch, index)
            policy = unwrap_ddp(model)
            with policy.disable_adapter():
                return self.sequence_log_probs(self.policy_view, policy, batch, index)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        index = example_index(batch)
        reference = self.reference_log_probs(model, batch, index)  # first: its temporaries are freed before the policy's activations exist
        policy = self.sequence_log_probs(self.policy_view, model, batch, index)
        cfg = self.cfg
        tokens = policy.tokens.clamp(min=1)
        chosen_ratio = policy.summed[0::2] - reference.summed[0::2]
        rejected_ratio = policy.summed[1::2] - reference.summed[1::2]
        margin = chosen_ratio - rejected_ratio
        if cfg.loss == "sigmoid":
            per_pair = -(1 - cfg.label_smoothing) * F.logsigmoid(cfg.beta * margin) - cfg.label_smoothing * F.logsigmoid(-cfg.beta * margin)
        elif cfg.loss == "ipo":
            average = (policy.summed - reference.summed) / tokens
            per_pair = (average[0::2] - average[1::2] - 1 / (2 * cfg.beta)) ** 2
        else:
            per_pair = F.relu(1 - cfg.beta * margin)
        if cfg.sft_weight:
            per_pair = per_pair + cfg.sft_weight * (-policy.summed[0::2] / tokens[0::2])
        loss = (per_pair * self._pair_weights(batch, index, len(per_pair))).sum()
        chosen_reward, rejected_reward = (cfg.beta * chosen_ratio).detach(), (cfg.beta * rejected_ratio).detach()
        return loss, {
            "loss_sum": float(loss.detach()), "pairs": len(per_pair),
            "reward_correct": int((margin.detach() > 0).sum()), "margin_sum": float((chosen_reward - rejected_reward).sum()),
            "chosen_reward_sum": float(chosen_reward.sum()), "rejected_reward_sum": float(rejected_reward.sum()),
            "chosen_logp_sum": float(policy.summed[0::2].detach().sum()),
        }

    @staticmethod
    def _pair_weights(batch: dict[str, torch.Tensor], owner: torch.Tensor, pairs: int) -> torch.Tensor:
        """Each pair's ``data.weight_column`` weight (both its sequences carry it)."""
        weights = batch.get("weights")
        if weights is None:
            return torch.ones(pairs)
        per_sequence = torch.ones(2 * pairs)
        inside = owner >= 0
        per_sequence[owner[inside]] = weights[inside].float()
        return per_sequence[0::2]

    def summarize(self, stats: Stats) -> dict[str, float]:
        pairs = max(1, stats.get("pairs", 0))
        return {
            "loss": stats.get("loss_sum", 0.0) / pairs,
            "reward_accuracy": stats.get("reward_correct", 0) / pairs,
            "reward_margin": stats.get("margin_sum", 0.0) / pairs,
            "chosen_reward": stats.get("chosen_reward_sum", 0.0) / pairs,
            "rejected_reward": stats.get("rejected_reward_sum", 0.0) / pairs,
            "chosen_logp": stats.get("chosen_logp_sum", 0.0) / pairs,
        }


def adapters_only(model: torch.nn.Module) -> bool:
    """Whether switching the peft adapters off gives back the model as it was before training:
    every trainable weight belongs to the active adapter."""
    peft_model = unwrap_ddp(model)
    if unwrap_peft(peft_model) is peft_model or not hasattr(peft_model, "disable_adapter"):
        return False
    adapter = getattr(peft_model, "active_adapter", "default")
    return all(adapter in name.split(".") for name, p in peft_model.named_parameters() if p.requires_grad)


@register_objective("dpo", DPOConfig, heads=(None,), shape="preference")
def dpo(cfg: DPOConfig, ctx: ObjectiveContext) -> DPOObjective:
    if cfg.reference is None and adapters_only(ctx.model):
        return DPOObjective(cfg, ctx.model, None)
    name = cfg.reference or ctx.model_name
    if name is None:
        raise UserError("DPO needs a reference model", where="objective.reference", hint="name one, or set model.name")
    return DPOObjective(cfg, ctx.model, ctx.auxiliary_model(name))
