"""Evaluation items: rows of a data file, with their references and options read by field name.

Rows come from ``tunelab.data.readers`` (JSONL, JSON, CSV, Parquet...), so every complaint names
``file:line``. A reference may be a string, a number or a list of them (several correct answers);
a multiple-choice item's correct option is its text or its index among the options. A preference
row (``prompt``, ``chosen``, ``rejected`` strings: DPO data) is a two-option item whose correct option
is the chosen answer, so the choice task's accuracy on held-out pairs is the model's win rate: how
often it finds the preferred answer more likely than the rejected one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunelab.data.bad_rows import BadRows
from tunelab.data.readers import Row, read_rows
from tunelab.errors import UserError


def read_items(path: str, max_examples: int | None = None, setting: str = "--data / eval.data") -> list[Row]:
    """The rows to evaluate (the first ``max_examples`` when given)."""
    rows = read_rows(path, BadRows("error"), setting)
    return rows[:max_examples] if max_examples else rows


def field(row: Row, name: str) -> Any:
    if name not in row.fields or row.fields[name] is None:
        raise UserError(
            f"row has no field '{name}' (it has: {', '.join(row.fields) or 'none'})",
            where=row.where,
            hint="set eval.answer_field / eval.text_field / eval.choices_field to the right column",
        )
    return row.fields[name]


def references(row: Row, name: str) -> list[str]:
    """The item's acceptable answers as strings."""
    value = field(row, name)
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (str, int, float, bool)) for v in values):
        raise UserError(f"field '{name}' must be an answer or a list of answers", where=row.where)
    return [str(v) for v in values]


def options(row: Row, shared: Sequence[str] | None, name: str) -> list[str]:
    """The item's options: the shared list, else its own ``name`` field (a list of strings)."""
    if shared:
        return list(shared)
    if name not in row.fields and _preference(row):
        return [row.fields["chosen"], row.fields["rejected"]]
    value = field(row, name)
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) for v in value):
        raise UserError(f"field '{name}' must list at least two options as strings", where=row.where, hint="or set eval.choices")
    return value


def correct_option(row: Row, opts: Sequence[str], name: str) -> int:
    """Index of the correct option: the answer field holds its text or its index (a preference
    row's is its chosen answer)."""
    if name not in row.fields and _preference(row) and list(opts[:2]) == [row.fields["chosen"], row.fields["rejected"]]:
        return 0
    value = field(row, name)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(opts):
        return value
    if isinstance(value, str) and value in opts:
        return opts.index(value)
    raise UserError(
        f"answer {value!r} is neither one of the options {list(opts)} nor an index into them",
        where=row.where,
    )


def _preference(row: Row) -> bool:
    return all(isinstance(row.fields.get(key), str) for key in ("chosen", "rejected"))
