"""Importance sampling of examples: draw the examples the model finds hard more often, unbiased.

Every ``refresh_every`` steps the trainer scores each training example with the current model;
example ``i`` is then drawn with probability ``p_i = (1 - m) * loss_i / sum(loss) + m / n`` and its
loss multiplied by ``1 / (n * p_i)``, so the expected step is still the plain mean over the data
(the loss-proportional sampler of Katharopoulos & Fleuret 2018, with a uniform share ``m`` that
bounds every weight by ``1 / m``). Each optimizer step's examples are drawn with replacement from
its own seeded stream; before the first scores, and whenever every loss is equal, it is uniform sampling
with weight 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from tunelab.config_base import Section
from tunelab.train.samplers import (
    SamplerContext,
    batch_generator,
    chunk,
    register_sampler,
)


class ImportanceConfig(Section):
    """Sample examples in proportion to their current loss, with unbiasing loss weights."""

    refresh_every: int = Field(10, ge=1, description="Steps between re-scoring every training example with the current model.")
    uniform_mix: float = Field(0.2, gt=0, le=1, description="Share of probability spread uniformly: no example is starved, no weight exceeds 1/uniform_mix.")


def sampling_probabilities(losses: Sequence[float], uniform_mix: float) -> torch.Tensor:
    """``p_i`` from the losses (float64; uniform when the losses are all zero)."""
    loss = torch.tensor(losses, dtype=torch.float64).clamp_min(0)
    n = loss.numel()
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
    total = loss.sum()
    if total <= 0:
        return uniform
    return (1 - uniform_mix) * loss / total + uniform_mix * uniform


class ImportanceSampler:
    def __init__(self, num_examples: int, batch_size: int, seed: int, cfg: ImportanceConfig):
        self.num_examples, self.batch_size, self.seed, self.cfg = num_examples, batch_size, seed, cfg
        self.probabilities = torch.full((num_examples,), 1.0 / num_examples, dtype=torch.float64)
        self.scored_step: int | None = None
        self.batches_per_step = 1

    def num_batches(self) -> int:
        return self.num_examples // self.batch_size

    def bind(self, total_steps: int, batches_per_step: int) -> None:
        self.batches_per_step = batches_per_step

    def batches(self, epoch: int) -> list[list[int]]:
        """Each optimizer step's draw, cut into its micro-batches (the same examples however the
        step is split over processes and accumulation)."""
        per_step = self.batch_size * self.batches_per_step
        out: list[list[int]] = []
        for step in range(self.num_batches() // self.batches_per_step):
            draw = torch.multinomial(self.probabilities, per_step, replacement=True, generator=batch_generator(self.seed, epoch, step))
            out += chunk(draw.tolist(), self.batch_size)
        return out

    def weight_of(self, index: int) -> float:
        return float(1.0 / (self.num_examples * self.probabilities[index]))

    def scores_due(self, step: int) -> bool:
        return self.scored_step is None or step - self.scored_step >= self.cfg.refresh_every

    def set_scores(self, step: int, scores: Sequence[float]) -> None:
        self.probabilities = sampling_probabilities(scores, self.cfg.uniform_mix)
        self.scored_step = step

    def describe(self, step: int) -> dict[str, float]:
        p = self.probabilities
        return {
            "max_weight": round(float(1.0 / (self.num_examples * p.min())), 4),
            # 1 / (n * sum p^2): 1 when uniform, down to 1/n when one example takes every draw.
            "effective_fraction": round(float(1.0 / (self.num_examples * (p * p).sum())), 4),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"probabilities": self.probabilities, "scored_step": self.scored_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probabilities, self.scored_step = state["probabilities"], state["scored_step"]


@register_sampler("importance", ImportanceConfig)
def _importance(cfg: ImportanceConfig, ctx: SamplerContext) -> ImportanceSampler:
    return ImportanceSampler(len(ctx.examples), ctx.batch_size, ctx.seed, cfg)
