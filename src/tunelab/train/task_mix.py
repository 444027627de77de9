"""Multi-task mixing as a sampler: every micro-batch holds one task's examples, tasks drawn by share.

A multi-task run's training examples are every task's examples end to end, each carrying its
``task`` index; in a single-model run the task is the name each example carries (its
``data.task_column`` value, or its ``data.mixture`` source). An epoch has as many micro-batches as the examples fill; each task's share of them
follows ``strategy``: by size (p ∝ n), uniform, or temperature (p ∝ n^(1/T)), split by largest
remainder. A task whose share exceeds its data cycles through it in fresh seeded orders. The
batches' order is shuffled per epoch, all as a pure function of (seed, epoch) like every sampler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from tunelab.config_base import Section
from tunelab.errors import UserError
from tunelab.train.samplers import SamplerContext, register_sampler


class TaskMixConfig(Section):
    """How often each task's batches come up (a multi-task run's default sampler)."""

    strategy: Literal["size", "uniform", "temperature"] = "size"
    temperature: float = Field(2.0, gt=0, description="T for strategy temperature: 1 is by size, large T approaches uniform.")


def task_shares(sizes: Sequence[int], cfg: TaskMixConfig) -> list[float]:
    """Sampling probability of each task: ∝ n (size), equal (uniform), or ∝ n^(1/T) (temperature)."""
    power = {"size": 1.0, "uniform": 0.0, "temperature": 1.0 / cfg.temperature}[cfg.strategy]
    raw = [n**power for n in sizes]
    return [r / sum(raw) for r in raw]


def batch_counts(shares: Sequence[float], total: int) -> list[int]:
    """``total`` batches split by ``shares`` (largest remainder)."""
    counts = [math.floor(s * total) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda t: shares[t] * total - counts[t], reverse=True)
    for t in by_remainder[: total - sum(counts)]:
        counts[t] += 1
    return counts


class TaskMixSampler:
    """Single-task micro-batches in task proportions ``shares``; ``tasks[i]`` is example i's task."""

    def __init__(self, tasks: Sequence[int], shares: Sequence[float], batch_size: int, seed: int):
        self.members = [[i for i, t in enumerate(tasks) if t == task] for task in range(len(shares))]
        self.batch_size, self.seed = batch_size, seed
        self.counts = batch_counts(shares, max(1, len(tasks) // batch_size))

    def num_batches(self) -> int:
        return sum(self.counts)

    def batches(self, epoch: int) -> list[list[int]]:
        size, out = self.batch_size, []
        for t, (members, count) in enumerate(zip(self.members, self.counts)):
            order: list[int] = []
            rounds = 0
            while len(order) < count * size:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * t + 104_729 * epoch + rounds)
                order += [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
                rounds += 1
            out += [order[b * size : (b + 1) * size] for b in range(count)]
        mixed = torch.randperm(len(out), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)).tolist()
        return [out[i] for i in mixed]


@register_sampler("task_mix", TaskMixConfig)
def _task_mix(cfg: TaskMixConfig, ctx: SamplerContext) -> TaskMixSampler:
    """Over a multi-task run's tasks, or else over the task names rows carry (``data.task_column``,
    ``data.mixture``)."""
    tasks = [e.task for e in ctx.examples]
    if any(t is None for t in tasks):
        names = [e.task_name for e in ctx.examples]
        if any(n is None for n in names):
            raise UserError("sampler task_mix mixes tasks, and these examples name none", where="sampler.name",
                            hint="define method.tasks, set data.task_column or train on a data.mixture, or choose another sampler")
        order = {name: i for i, name in enumerate(sorted(set(names)))}  # type: ignore[type-var]
        tasks = [order[n] for n in names]
    sizes = [tasks.count(t) for t in range(max(tasks) + 1)]  # type: ignore[type-var]
    return TaskMixSampler(tasks, task_shares(sizes, cfg), ctx.batch_size, ctx.seed)  # type: ignore[arg-type]
