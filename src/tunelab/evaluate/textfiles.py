"""Read any system's predictions and references from files, so ``tunelab metrics`` can score them.

Two layouts are accepted, chosen by extension: a data file (``.jsonl``, ``.json``, ``.csv``, ...)
read through ``tunelab.data.readers`` with the text in a named field, or plain text with one item
per line (empty lines are empty predictions, kept so line numbers stay aligned). References may
come from several files, one reference set each (sacrebleu's convention), and a JSONL field may
hold a list of references for one item.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunelab.data.bad_rows import BadRows
from tunelab.data.readers import READERS, read_rows
from tunelab.errors import UserError
from tunelab.userfiles import read_user_text

PREDICTION_FIELDS = ("prediction", "text", "output")
REFERENCE_FIELDS = ("references", "reference", "answers", "answer", "text")


def read_predictions(path: str | Path) -> list[str]:
    """One prediction string per item."""
    values = _read_items(Path(path), PREDICTION_FIELDS, "--predictions")
    for value, where in values:
        if not isinstance(value, str):
            raise UserError(f"a prediction must be a string, got {type(value).__name__}", where=where)
    return [value for value, _ in values]


def read_references(paths: Sequence[str | Path]) -> list[list[str]]:
    """One list of reference strings per item, merged across files item by item."""
    if not paths:
        raise UserError("references missing", hint="pass --references FILE (repeat it for several reference sets)")
    per_file = [[_as_references(value, where) for value, where in _read_items(Path(p), REFERENCE_FIELDS, "--references")] for p in paths]
    lengths = {len(items) for items in per_file}
    if len(lengths) > 1:
        raise UserError(
            "reference files differ in length: " + ", ".join(f"{p} has {len(items)}" for p, items in zip(paths, per_file)),
            hint="every reference file needs one line/row per prediction",
        )
    return [[ref for items in per_file for ref in items[i]] for i in range(len(per_file[0]))]


def _as_references(value: Any, where: str) -> list[str]:
    refs = value if isinstance(value, list) else [value]
    if not all(isinstance(ref, str) for ref in refs):
        raise UserError("references must be strings or lists of strings", where=where)
    return refs


def _read_items(path: Path, fields: Sequence[str], setting: str) -> list[tuple[Any, str]]:
    """``(value, where)`` per item: the first of ``fields`` present in each row, or each text line."""
    if path.suffix in READERS:
        return [(_field(row.fields, fields, row.where), row.where) for row in read_rows(path, BadRows("error"), setting)]
    text = read_user_text(path)
    return [(line, f"{path}:{n}") for n, line in enumerate(text.splitlines(), 1)]


def _field(row: dict[str, Any], fields: Sequence[str], where: str) -> Any:
    for name in fields:
        if name in row:
            return row[name]
    raise UserError(
        f"row has none of the fields {', '.join(fields)} (it has: {', '.join(row) or 'none'})",
        where=where,
        hint="rename the field, or use a plain text file with one item per line",
    )
