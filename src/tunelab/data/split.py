"""Exact-duplicate removal and the seeded train/validation split."""

from __future__ import annotations

import json
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
    """Shuffle, then split off ``fraction`` (at least one row when fraction > 0) for validation.

    Records that share a prompt stay on one side, whole prompts being held out: preference pairs
    on the same prompt, and contrastive pairs on the same anchor (a Cohere rerank row is several
    pairs of one query). A validation example whose prompt was trained on measures memorisation
    more than what was learnt.
    """
    n_val = max(1, round(len(records) * fraction)) if fraction > 0 else 0
    if n_val and n_val >= len(records):
        raise _too_few(len(records), fraction)
    keys = [_prompt_key(r) for r in records]
    if len(set(keys)) == len(keys):
        order = shuffled(records, seed)
        return order[n_val:], order[:n_val]
    groups: dict[str, list[Record]] = {}
    for key, record in zip(keys, records):
        groups.setdefault(key, []).append(record)
    order = shuffled(list(groups.values()), seed)  # type: ignore[arg-type]
    validation: list[Record] = []
    while order and len(validation) < n_val:
        validation += order.pop(0)
    if not order:
        raise _too_few(len(groups), fraction, "prompts")
    return [r for group in order for r in group], validation


def _prompt_key(record: Record) -> str:
    """What records that must stay together share: a preference pair's prompt, a contrastive
    pair's anchor; otherwise the record itself (its position keeps it unique)."""
    if record.chosen is not None:
        return json.dumps(record.messages, sort_keys=True)
    if record.texts and record.text is None and record.label is None:
        return "anchor:" + str(record.texts[0])
    return f"row:{id(record)}"


def _too_few(count: int, fraction: float, what: str = "rows") -> UserError:
    return UserError(
        f"only {count} usable {what}: too few to hold out data.val_fraction = {fraction} for validation",
        hint="add rows, give a data.validation file, or set data.val_fraction: 0",
    )
