"""Exact-duplicate removal and the seeded train/validation split."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from tunelab.data.formats import Record
from tunelab.errors import UserError


def remove_duplicates(records: Sequence[Record], also_seen: Iterable[str] = ()) -> tuple[list[Record], int]:
    """Records without exact repeats (first occurrence kept) and without any key in ``also_seen``.

    ``also_seen`` holds the validation set's keys when ``records`` is the training set: a training
    row repeated in validation would make the validation loss measure memorisation.
    """
    seen = set(also_seen)
    kept = []
    for record in records:
        key = record.key()
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept, len(records) - len(kept)


def shuffled(records: Sequence[Record], seed: int) -> list[Record]:
    """A copy in a seeded random order (the same seed gives the same order)."""
    out = list(records)
    random.Random(seed).shuffle(out)
    return out


def hold_out(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Shuffle, then split off ``fraction`` (at least one row when fraction > 0) for validation."""
    order = shuffled(records, seed)
    n_val = max(1, round(len(order) * fraction)) if fraction > 0 else 0
    if n_val and n_val >= len(order):
        raise UserError(
            f"only {len(order)} usable rows: too few to hold out data.val_fraction = {fraction} for validation",
            hint="add rows, give a data.validation file, or set data.val_fraction: 0",
        )
    return order[n_val:], order[:n_val]
