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
    values = {value for r in train for value in r.label_values()}
    if all(isinstance(v, int) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def label_id(record: Record, index: dict[str, int], declared: bool, value: str | int | None = None) -> int:
    """The class id of ``record``'s label (or of ``value``, one of its labels or tags); an unknown
    label is a UserError at the row."""
    value = record.label if value is None else value
    name = str(value)
    if name not in index:
        known = ", ".join(index) if len(index) <= 20 else f"{len(index)} labels"
        hint = (
            "add it to data.labels, or fix the row"
            if declared
            else "it does not occur in the training split; declare data.labels"
        )
        raise UserError(f"label {value!r} is not one of the labels ({known})", where=record.where, hint=hint)
    return index[name]
