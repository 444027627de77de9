"""Meta-learning: Reptile and first-order MAML, as an objective that wraps the model's own.

Goal: an initialisation (of the full model or of an adapter) from which a few SGD steps on a
new task's handful of examples reach a good model for that task (``tunelab adapt`` takes them).

Each micro-batch is an *episode* drawn from one task (``data.task_column``): ``support`` rows to
adapt on, then ``query`` rows. For each episode the objective

1. copies the trainable weights θ, takes ``inner_steps`` plain SGD steps (``inner_lr``) on the
   support rows with the wrapped objective (causal LM, or the head's), reaching φ;
2. forms the meta-gradient: first-order MAML (Finn et al., 2017, §5.2): the query loss's gradient
   at φ; Reptile (Nichol et al., 2018): (θ − φ) / (inner_lr · inner_steps), the mean inner-step
   gradient, which for one inner step is exactly the support gradient at θ, i.e. plain SGD;
3. puts θ back and returns a surrogate loss whose gradient with respect to θ is that meta-gradient
   (its value is the query loss, or Reptile's last support loss, which is what gets logged).

So the trainer's own machinery applies the outer update: its optimizer, schedule, clipping,
gradient accumulation (episodes per meta-step), checkpoints and exact resume. Evaluation
(under ``no_grad``) scores the initialisation itself with the wrapped objective.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from tunelab.config_base import Section
from tunelab.data import Example
from tunelab.errors import UserError
from tunelab.train.objectives.base import (
    Objective,
    ObjectiveContext,
    Stats,
    build_objective,
    register_objective,
)
from tunelab.train.samplers import SamplerContext, batch_generator


class MetaConfig(Section):
    """Meta-learning over tasks (Reptile or first-order MAML) around the model's own objective."""

    algorithm: Literal["reptile", "fomaml"] = Field("reptile", description="reptile: move toward the adapted weights; fomaml: the query loss's gradient at them.")
    support: int = Field(8, gt=0, description="Rows of one task each episode adapts on.")
    query: int = Field(8, ge=0, description="Further rows of the same task the adapted weights are scored on (fomaml needs some).")
    inner_steps: int = Field(5, gt=0, description="SGD steps on the support rows per episode (as tunelab adapt --steps will take).")
    inner_lr: float = Field(1e-3, gt=0, description="Learning rate of those SGD steps.")

    @model_validator(mode="after")
    def _query_for_fomaml(self) -> MetaConfig:
        if self.algorithm == "fomaml" and self.query == 0:
            raise ValueError("fomaml scores the adapted weights on query rows: set query > 0")
        return self


class EpisodeSampler:
    """Each micro-batch: ``support + query`` distinct examples of one task chosen uniformly at
    random; a pure function of (seed, epoch, micro-batch). An epoch has as many episodes as the
    training examples fill."""

    def __init__(self, examples: list[Example] | Any, support: int, query: int, seed: int):
        self.size, self.seed = support + query, seed
        tasks: dict[str, list[int]] = {}
        for i, example in enumerate(examples):
            if example.task_name is None:
                raise UserError("meta-learning draws each episode from one task: the training rows need a task name",
                                where="data.task_column", hint="set data.task_column to the column that names each row's task")
            tasks.setdefault(example.task_name, []).append(i)
        small = sorted(name for name, members in tasks.items() if len(members) < self.size)
        if small:
            raise UserError(f"task {small[0]!r} has fewer training rows than one episode takes ({self.size} = support + query)"
                            + (f" (and {len(small) - 1} more tasks)" if len(small) > 1 else ""), where="objective.support",
                            hint="lower objective.support/query, or give every task more rows")
        self.tasks = [tasks[name] for name in sorted(tasks)]
        self.count = max(1, len(examples) // self.size)

    def num_batches(self) -> int:
        return self.count

    def batches(self, epoch: int) -> list[list[int]]:
        episodes = []
        for k in range(self.count):
            generator = batch_generator(self.seed, epoch, k)
            members = self.tasks[int(torch.randint(len(self.tasks), (1,), generator=generator))]
            order = torch.randperm(len(members), generator=generator)[: self.size].tolist()
            episodes.append([members[j] for j in order])
        return episodes


def _rows(batch: dict[str, torch.Tensor], start: int, stop: int | None) -> dict[str, torch.Tensor]:
    return {key: value[start:stop] for key, value in batch.items()}


class MetaObjective:
    """See the module docstring."""

    name = "meta"
    #: Rows must stay separable into support and query: one padded row per example.
    collation = "padded"

    def __init__(self, cfg: MetaConfig, inner: Objective):
        self.cfg, self.inner = cfg, inner
        self.unit_name = getattr(inner, "unit_name", "supervised")

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return self.inner.units(batch)

    def summarize(self, stats: Stats) -> dict[str, float]:
        return self.inner.summarize(stats)

    def _mean_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        loss_sum, stats = self.inner(model, batch)
        return loss_sum / max(1, self.inner.units(batch)), stats

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        if not torch.is_grad_enabled():  # evaluation: the initialisation itself
            return self.inner(model, batch)
        cfg = self.cfg
        params = [p for p in model.parameters() if p.requires_grad]
        support, query = _rows(batch, 0, cfg.support), _rows(batch, cfg.support, None)
        start = [p.detach().clone() for p in params]
        for _ in range(cfg.inner_steps):
            loss, stats = self._mean_loss(model, support)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for param, grad in zip(params, grads, strict=True):
                    if grad is not None:
                        param.sub_(grad, alpha=cfg.inner_lr)
        if cfg.algorithm == "fomaml":
            loss, stats = self._mean_loss(model, query)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            meta = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        else:
            scale = 1.0 / (cfg.inner_lr * cfg.inner_steps)
            meta = [(s - p.detach()) * scale for s, p in zip(start, params, strict=True)]
        with torch.no_grad():
            for param, value in zip(params, start, strict=True):
                param.copy_(value)
        units = self.units(batch)
        surrogate = sum((p * g).sum() for p, g in zip(params, meta, strict=True)) * units
        return surrogate - surrogate.detach() + loss.detach() * units, stats


def _episodes(cfg: MetaConfig, ctx: SamplerContext) -> EpisodeSampler:
    return EpisodeSampler(ctx.examples, cfg.support, cfg.query, ctx.seed)


@register_objective("meta", MetaConfig, sampler=_episodes)
def _meta(cfg: MetaConfig, ctx: ObjectiveContext) -> Objective:
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise UserError("meta-learning runs in one process (its inner steps are not data-parallel)", where="objective.name", hint="run it without torchrun")
    if ctx.default_objective == "meta":
        raise UserError("objective meta wraps the model's own objective and cannot wrap itself", where="objective.name")
    return MetaObjective(cfg, build_objective(ctx.default_objective, None, ctx))
