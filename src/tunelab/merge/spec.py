"""What a merge is asked to do, checked before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tunelab.errors import UserError

#: uniform: the mean of the members (a uniform soup); greedy: a soup grown member by member while
#: held-out accuracy does not fall (Wortsman et al., 2022); linear / task_arithmetic: base +
#: scale * sum(w_i * task_vector_i) (defaults 1/n and 1 each); ties, dare_linear, dare_ties: the
#: task vectors trimmed to ``density`` (by magnitude, TIES; at random and rescaled, DARE), signs
#: elected for the ties variants, then combined (Yadav et al., 2023; Yu et al., 2024).
MERGE_METHODS = ("uniform", "greedy", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")


@dataclass(frozen=True)
class MergeSpec:
    """A merge method and its settings (see ``MERGE_METHODS``)."""

    method: str
    weights: tuple[float, ...] | None = None
    scale: float = 1.0
    density: float = 0.5
    majority_sign: Literal["total", "frequency"] = "total"
    #: Rank of a merged LoRA adapter for ties/dare (peft's SVD of the merged delta); None: sum of the members' ranks.
    rank: int | None = None
    seed: int = 0

    def check(self, members: int) -> None:
        if self.method not in MERGE_METHODS:
            raise UserError(f"unknown merge method '{self.method}'", where="--method", hint=f"choose one of {', '.join(MERGE_METHODS)}")
        if self.weights is not None and len(self.weights) != members:
            raise UserError(f"{len(self.weights)} weights for {members} runs", where="--weights", hint="give one weight per run, e.g. 0.5,0.5")
        if self.weights is not None and self.method in ("uniform", "greedy"):
            raise UserError(f"--weights does not apply to a {self.method} soup (its members weigh the same)", where="--weights")
        if not 0 < self.density <= 1:
            raise UserError(f"density {self.density} is not in (0, 1]", where="--density", hint="the share of each task vector kept, e.g. 0.5")

    def member_weights(self, members: int) -> list[float]:
        """Each member's weight, ``scale`` included."""
        if self.weights is not None:
            given = list(self.weights)
        elif self.method in ("uniform", "greedy", "linear"):
            given = [1 / members] * members
        else:  # task arithmetic, TIES and DARE add task vectors
            given = [1.0] * members
        return [self.scale * w for w in given]
