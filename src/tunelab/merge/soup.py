"""The greedy soup (Wortsman et al., 2022): rank the members by held-out score, start from the
best, and add each next one only if the soup's held-out score does not fall."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: ``score(indices) -> float``: build the uniform soup of those members and score it held out.
Scorer = Callable[[list[int]], float]


def greedy_soup(members: int, score: Scorer) -> tuple[list[int], list[dict[str, Any]]]:
    """The chosen members (indices) and a trace of every score taken."""
    alone = [score([i]) for i in range(members)]
    trace: list[dict[str, Any]] = [{"members": [i], "score": s} for i, s in enumerate(alone)]
    order = sorted(range(members), key=lambda i: -alone[i])
    chosen, best = [order[0]], alone[order[0]]
    for candidate in order[1:]:
        value = score([*chosen, candidate])
        kept = value >= best
        trace.append({"members": [*chosen, candidate], "score": value, "kept": kept})
        if kept:
            chosen, best = [*chosen, candidate], value
    return chosen, trace
