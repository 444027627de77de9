"""Data order as a plug-in: which training examples form each micro-batch of an epoch.

A sampler is a pure function of (seed, epoch): ``batches(epoch)`` lists every micro-batch of the
epoch, for all processes, as indices into the training examples. The trainer takes optimizer
step ``s``'s micro-batch ``j`` on rank ``r`` at position ``(s * grad_accum + j) * world + r``, so
resuming at any step needs no replay and every process of a data-parallel run knows its shard
without communication; one process with batch ``2B`` and two with ``B`` see the same examples.
Curriculum, importance and multi-task mixing are samplers; register one with ``register_sampler``
and choose it with ``sampler: {name: ...}``.

Optional hooks, for samplers whose order depends on training progress or on the model:

- ``bind(total_steps, batches_per_step)``: called once the run's length is known (a pacing
  function needs to know how far through training micro-batch ``k`` of epoch ``e`` falls).
- ``scores_due(step) -> bool`` and ``set_scores(step, scores)``: before drawing step ``step``'s
  batches the trainer asks whether the sampler wants every training example's current loss; if
  so it scores them (``tunelab.train.example_scores``) and hands the list over. Batches are then
  a pure function of (seed, epoch, micro-batch, scores), and ``state_dict``/``load_state_dict``
  carry the scores through checkpoints, so a resumed run draws exactly what it would have.
- ``weight_of(index) -> float``: a factor on that example's loss (importance sampling's
  unbiasing weight), read when its batch is collated.
- ``describe(step) -> dict``: numbers to log with the step (the curriculum's pool size).

A sampler's config may define ``check_data(data)``: ``tunelab train`` (before the model loads)
and ``tunelab recipe validate`` call it with the recipe's ``data:`` section, for settings that
need data columns (a curriculum by ``column`` needs ``data.difficulty_column``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tunelab.config_base import Section
from tunelab.data import Example
from tunelab.plugins import Registry


class Sampler(Protocol):
    """What the trainer needs to know about data order."""

    def num_batches(self) -> int:
        """Micro-batches per epoch (the same every epoch, so the schedule's length is known)."""

    def batches(self, epoch: int) -> list[list[int]]:
        """Every micro-batch of ``epoch`` as example indices; the same answer for the same (seed, epoch)."""


@dataclass(frozen=True)
class SamplerContext:
    """What a sampler is built from."""

    examples: Sequence[Example]
    batch_size: int
    seed: int
    #: Each example's loss under another model (a teacher, by name), scored through the run's
    #: objective and collation; None where the run cannot load one.
    losses_under: Callable[[str], list[float]] | None = None


@dataclass(frozen=True)
class SamplerPlugin:
    Config: type[Section]
    build: Callable[[Any, SamplerContext], Sampler]


SAMPLERS: Registry[SamplerPlugin] = Registry("sampler", "sampler.name")


def register_sampler(name: str, Config: type[Section]) -> Callable[[Callable[[Any, SamplerContext], Sampler]], Callable[[Any, SamplerContext], Sampler]]:
    """Register ``build(cfg, ctx) -> Sampler``; ``Config`` is the ``sampler:`` section's schema (the recipe
    schema adds its ``name`` key)."""

    def wrap(build: Callable[[Any, SamplerContext], Sampler]) -> Callable[[Any, SamplerContext], Sampler]:
        SAMPLERS.register(name, SamplerPlugin(Config, build))
        return build

    return wrap


def batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """The random stream of one draw (an optimizer step's examples): samplers that draw each step
    on its own (from a pool or a distribution that changes during the epoch) stay pure functions
    of (seed, epoch, step)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + batch) % 2**63)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def chunk(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive micro-batches of ``order``; a tail smaller than one batch is left out."""
    return [list(order[i : i + batch_size]) for i in range(0, len(order) - batch_size + 1, batch_size)]


class ShuffleSampler:
    """A fresh seeded permutation every epoch (the default)."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed

    def num_batches(self) -> int:
        return self.num_examples // self.batch_size

    def batches(self, epoch: int) -> list[list[int]]:
        return chunk(epoch_permutation(self.num_examples, self.seed, epoch), self.batch_size)


class SequentialSampler:
    """The training file's order, every epoch (for data already ordered, e.g. by difficulty)."""

    def __init__(self, num_examples: int, batch_size: int):
        self.num_examples, self.batch_size = num_examples, batch_size

    def num_batches(self) -> int:
        return self.num_examples // self.batch_size

    def batches(self, epoch: int) -> list[list[int]]:
        return chunk(range(self.num_examples), self.batch_size)


class ShuffleConfig(Section):
    """Shuffle the training examples every epoch with the run's seed."""


class SequentialConfig(Section):
    """Keep the training file's order (no shuffling)."""


@register_sampler("shuffle", ShuffleConfig)
def _shuffle(cfg: ShuffleConfig, ctx: SamplerContext) -> Sampler:
    return ShuffleSampler(len(ctx.examples), ctx.batch_size, ctx.seed)


@register_sampler("sequential", SequentialConfig)
def _sequential(cfg: SequentialConfig, ctx: SamplerContext) -> Sampler:
    return SequentialSampler(len(ctx.examples), ctx.batch_size)


def evaluation_batches(examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    """Evaluation batches of at most ``batch_size``, each of one task and one language (so metrics
    can be reported per language), in the order each (task, language) first appears."""
    groups: dict[tuple[int | None, str | None], list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault((example.task, example.language), []).append(i)
    return [chunk_ for members in groups.values() for chunk_ in (members[j : j + batch_size] for j in range(0, len(members), batch_size))]


def step_batches(all_batches: Sequence[list[int]], step_in_epoch: int, grad_accum: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's micro-batches of one optimizer step."""
    start = step_in_epoch * grad_accum * world_size
    return [list(all_batches[start + j * world_size + rank]) for j in range(grad_accum)]
