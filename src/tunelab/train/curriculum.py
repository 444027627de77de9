"""Curriculum learning as samplers: easy examples first, the admitted pool growing with a pacing function.

Examples are ranked by a difficulty score; at optimizer step ``s`` of ``T`` the step's examples
are drawn uniformly (without repetition inside the step) from the easiest ``ceil(c(s) * n)``, where the pacing function ``c`` grows from ``start_fraction`` to 1 at
``full_at * T`` (Bengio et al. 2009; the pool-and-pacing form of Hacohen & Weinshall 2019 and
Platanios et al. 2019). Difficulty comes from the example's length in tokens, a data column
(``data.difficulty_column``), label rarity, or a model's loss on it: the model being trained,
scored once before the first step, or a teacher. ``order: hardest_first`` is anti-curriculum.
Self-paced learning (Kumar et al. 2010) ranks by the *current* loss, re-scored every
``refresh_every`` steps: the threshold an example's loss must be under rises with the pace.
Ties are broken by a seeded shuffle, so equally hard examples never come in file order.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from tunelab.config_base import Section
from tunelab.data import DataConfig, Example
from tunelab.errors import UserError
from tunelab.train.samplers import (
    SamplerContext,
    batch_generator,
    chunk,
    register_sampler,
)

Pacing = Literal["linear", "root", "geometric", "baby_steps"]


class PacingConfig(Section):
    """How fast the pool of admitted examples grows."""

    pacing: Pacing = Field("linear", description="linear, root (Platanios et al.), geometric (exponential growth), or baby_steps (equal buckets).")
    start_fraction: float = Field(0.2, gt=0, le=1, description="Share of the examples admitted at the first step (baby_steps: 1/stages).")
    full_at: float = Field(0.5, gt=0, le=1, description="Share of training after which every example is admitted.")
    stages: int = Field(4, ge=2, description="baby_steps: the number of equal difficulty buckets, admitted one by one.")


def pace(cfg: PacingConfig, progress: float) -> float:
    """The admitted share of examples at ``progress`` (step / total steps, from 0)."""
    t = min(1.0, progress / cfg.full_at)
    c0 = cfg.start_fraction
    if cfg.pacing == "linear":
        share = c0 + (1 - c0) * t
    elif cfg.pacing == "root":
        share = math.sqrt(c0 * c0 + (1 - c0 * c0) * t)
    elif cfg.pacing == "geometric":
        share = c0 ** (1 - t)
    else:
        share = (math.floor(t * cfg.stages) + 1) / cfg.stages
    return min(1.0, share)


def difficulty_order(scores: Sequence[float], seed: int, hardest_first: bool = False) -> list[int]:
    """Example indices from easiest to hardest (or the reverse); ties in a seeded random order."""
    tiebreak = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed)).tolist()
    sign = -1.0 if hardest_first else 1.0
    return sorted(range(len(scores)), key=lambda i: (sign * scores[i], tiebreak[i]))


class CurriculumSampler:
    """Each step's examples drawn from the easiest ones, the pool growing with ``pacing``.

    With ``refresh_every`` the ranking is the model's current loss, re-scored that often (self-paced);
    with ``scores`` None and no refresh, it is scored once before the first step.
    """

    def __init__(
        self, num_examples: int, batch_size: int, seed: int, pacing: PacingConfig,
        scores: Sequence[float] | None = None, hardest_first: bool = False, refresh_every: int | None = None,
    ):
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.pacing, self.hardest_first, self.refresh_every = pacing, hardest_first, refresh_every
        self.total_steps, self.batches_per_step = 1, 1
        self.scores: list[float] | None = None
        self.scored_step: int | None = None
        self.order: list[int] = []
        if scores is not None:
            self._rank(scores)

    def _rank(self, scores: Sequence[float]) -> None:
        self.scores = list(scores)
        self.order = difficulty_order(self.scores, self.seed, self.hardest_first)

    def bind(self, total_steps: int, batches_per_step: int) -> None:
        self.total_steps, self.batches_per_step = total_steps, batches_per_step

    def num_batches(self) -> int:
        return self.num_examples // self.batch_size

    def pool_size(self, step: int) -> int:
        """How many of the easiest examples step ``step`` draws from (at least one step's batch)."""
        share = pace(self.pacing, step / self.total_steps)
        smallest = min(self.num_examples, self.batch_size * self.batches_per_step)
        return max(smallest, min(self.num_examples, math.ceil(share * self.num_examples - 1e-9)))

    def batches(self, epoch: int) -> list[list[int]]:
        """Each optimizer step's examples, drawn together from its pool and cut into its
        micro-batches: one process with batch 2B and two with B draw the same examples."""
        if self.scores is None:
            raise RuntimeError("the curriculum has no difficulty scores yet (the trainer scores before the first step)")
        out = []
        for step in range(self.num_batches() // self.batches_per_step):
            pool = self.pool_size(epoch * (self.num_batches() // self.batches_per_step) + step)
            picks = torch.randperm(pool, generator=batch_generator(self.seed, epoch, step))[: self.batch_size * self.batches_per_step]
            out += chunk([self.order[i] for i in picks.tolist()], self.batch_size)
        return out

    def scores_due(self, step: int) -> bool:
        if self.scores is None:
            return True
        return self.refresh_every is not None and self.scored_step is not None and step - self.scored_step >= self.refresh_every

    def set_scores(self, step: int, scores: Sequence[float]) -> None:
        self._rank(scores)
        self.scored_step = step

    def describe(self, step: int) -> dict[str, float]:
        pool = self.pool_size(step)
        out: dict[str, float] = {"pool": pool, "pool_fraction": round(pool / self.num_examples, 4)}
        if self.refresh_every is not None and self.scores is not None:
            out["loss_threshold"] = self.scores[self.order[pool - 1]]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "scored_step": self.scored_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("scores") is not None:
            self._rank(state["scores"])
        self.scored_step = state.get("scored_step")


Difficulty = Literal["length", "column", "label_rarity", "loss"]


class CurriculumConfig(PacingConfig):
    """Easy examples first: rank by a difficulty score and admit a growing share of them."""

    difficulty: Difficulty = Field(
        "length", description="length (tokens), column (data.difficulty_column), label_rarity, or loss (a model's loss on each example)."
    )
    model: str | None = Field(None, description="difficulty loss: the model that scores (a teacher or run directory); default: the model being trained, before training.")
    order: Literal["easiest_first", "hardest_first"] = Field("easiest_first", description="hardest_first is anti-curriculum.")

    @model_validator(mode="after")
    def _model_only_for_loss(self) -> CurriculumConfig:
        if self.model is not None and self.difficulty != "loss":
            raise ValueError(f"model scores examples only for difficulty: loss (difficulty is {self.difficulty})")
        return self

    def check_data(self, data: DataConfig) -> None:
        """Before the model loads: a difficulty read from a column needs that column named."""
        if self.difficulty == "column" and not data.difficulty_column:
            raise UserError("sampler difficulty: column needs data.difficulty_column", where="sampler.difficulty",
                            hint="name the numeric column that holds each row's difficulty, e.g. data.difficulty_column: grade")


class SelfPacedConfig(PacingConfig):
    """Self-paced learning: admit the examples the model currently finds easiest, re-scored as it learns."""

    refresh_every: int = Field(10, ge=1, description="Steps between re-scoring every training example with the current model.")


def example_length(example: Example) -> int:
    """Tokens the example puts through the model (all sequences of a pair or group)."""
    sequences = [s for s in (example.group or [example.input_ids]) if s is not None]
    return sum(len(s) for s in sequences)


def label_rarity(examples: Sequence[Example]) -> list[float]:
    """``-log`` of each example's label frequency: examples of rare classes count as hard."""
    labels = [e.label for e in examples]
    if any(label is None for label in labels):
        raise UserError("difficulty label_rarity needs single-label examples", where="sampler.difficulty", hint="use length, column or loss")
    counts = Counter(labels)
    return [-math.log(counts[label] / len(labels)) for label in labels]


def static_difficulty(cfg: CurriculumConfig, ctx: SamplerContext) -> list[float] | None:
    """Scores known before training, or None when the trainer must score with the model."""
    examples = ctx.examples
    if cfg.difficulty == "length":
        return [float(example_length(e)) for e in examples]
    if cfg.difficulty == "column":
        if any(e.difficulty is None for e in examples):
            raise UserError("difficulty column needs data.difficulty_column", where="sampler.difficulty", hint="name the numeric column that holds each row's difficulty")
        return [float(e.difficulty) for e in examples]  # type: ignore[arg-type]
    if cfg.difficulty == "label_rarity":
        return label_rarity(examples)
    if cfg.model is not None:
        if ctx.losses_under is None:
            raise UserError("this run cannot score examples with another model", where="sampler.model")
        return ctx.losses_under(cfg.model)
    return None


@register_sampler("curriculum", CurriculumConfig)
def _curriculum(cfg: CurriculumConfig, ctx: SamplerContext) -> CurriculumSampler:
    scores = static_difficulty(cfg, ctx)
    return CurriculumSampler(len(ctx.examples), ctx.batch_size, ctx.seed, cfg, scores, hardest_first=cfg.order == "hardest_first")


@register_sampler("self_paced", SelfPacedConfig)
def _self_paced(cfg: SelfPacedConfig, ctx: SamplerContext) -> CurriculumSampler:
    return CurriculumSampler(len(ctx.examples), ctx.batch_size, ctx.seed, cfg, refresh_every=cfg.refresh_every)

