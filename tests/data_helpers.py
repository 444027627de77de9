"""Shared helpers for data tests: reading back which tokens carry loss."""

from __future__ import annotations

from tunelab.data import IGNORE_INDEX, Example


def supervised_runs(tokenizer, example: Example) -> list[str]:
    """The decoded text of each maximal run of supervised tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in example.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [tokenizer.decode(run) for run in runs]
