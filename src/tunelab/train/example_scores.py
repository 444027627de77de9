"""Each training example's loss under a model: what curricula rank by and importance sampling draws by.

One example per forward, through the run's own objective and collation, so the score is exactly
the loss the objective would train on for that example alone (mean over its units: tokens for a
causal LM, 1 for a head), for every objective and head alike, with no per-objective code. Example
weights are left out (a score says how hard an example is, not how much it counts). In a
data-parallel run each process scores every ``world``-th example and the sums are shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence

import torch

from tunelab.data import Example
from tunelab.train.distributed import World

Collate = Callable[[list[Example]], dict[str, torch.Tensor]]


@torch.no_grad()
def example_losses(
    model: torch.nn.Module,
    objective: object,
    collate: Collate,
    examples: Sequence[Example],
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    world: World | None = None,
    device: torch.device | None = None,
) -> list[float]:
    """Loss per example (in eval mode: no dropout), in the order of ``examples``; ``autocast``
    makes the precision context the training forward runs under."""
    world = world or World()
    was_training = model.training
    model.eval()
    losses = torch.zeros(len(examples), dtype=torch.float64)
    scope = getattr(objective, "attention_scope", None)
    try:
        for i in range(world.rank, len(examples), world.size):
            batch = collate([dataclasses.replace(examples[i], weight=1.0)])
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            with (scope(model, batch) if scope is not None else contextlib.nullcontext()), (autocast() if autocast is not None else contextlib.nullcontext()):
                loss_sum, _ = objective(model, batch)  # type: ignore[operator]
            losses[i] = float(loss_sum) / max(1, objective.units(batch))  # type: ignore[attr-defined]
    finally:
        model.train(was_training)
    if world.distributed:
        torch.distributed.all_reduce(losses)
    return losses.tolist()


@dataclasses.dataclass(frozen=True)
class ScoringRecord:
    """One scoring pass, for ``example_scores.jsonl``: when, how long, and the scores."""

    step: int
    seconds: float
    scores: list[float]

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.scores)
        return {"score_min": ordered[0], "score_median": ordered[len(ordered) // 2], "score_max": ordered[-1], "scoring_s": self.seconds}


def timed_losses(step: int, score: Callable[[], list[float]]) -> ScoringRecord:
    start = time.perf_counter()
    scores = score()
    return ScoringRecord(step, time.perf_counter() - start, scores)
