"""Classification labels: the label map and each row's class id."""

from __future__ import annotations

from collections.abc import Sequence

from tunelab.data.formats import Record
from tunelab.errors import UserError


def label_names(declared: Sequence[str | int] | None, train: Sequence[Record]) -> list[str]:
    """Class names in class-id order: ``data.labels`` if declared, else the sorted train labels.

    Integer labels sort numerically (2 before 10), so ``0..n-1`` labels keep their own ids.
    """
    if declared is not None:
        names = [str(name) for name in declared]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise UserError(f"data.labels lists {', '.join(repeated)} more than once", hint="list each label once")
        return names
    values = {r.label for r in train if r.label is not None}
    if all(isinstance(v, int) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def label_id(record: Record, index: dict[str, int], declared: bool) -> int:
    """The class id of ``record``; an unknown label is a UserError at the row."""
    name = str(record.label)
    if name not in index:
        known = ", ".join(index) if len(index) <= 20 else f"{len(index)} labels"
        hint = (
            "add it to data.labels, or fix the row"
            if declared
            else "it does not occur in the training split; declare data.labels"
        )
        raise UserError(f"label {record.label!r} is not one of the labels ({known})", where=record.where, hint=hint)
    return index[name]
