"""``Record``: one validated row reduced to what the model sees, and the field checks rows share.

Every check raises a ``UserError`` naming the row's ``file:line`` and the fix, so the same message
reaches the user whichever reader or shape produced the row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tunelab.data.prompting import Message
from tunelab.errors import UserError


@dataclass
class Record:
    """One row, validated: a conversation (sft), a text, a text and its label(s) or target, word
    tags, a group of texts (anchor/positive/negative, or the answer choices of a question), or a
    prompt with a preferred and a rejected answer."""

    where: str
    messages: list[Message] | None = None
    text: str | None = None
    label: str | int | float | list[str] | None = None
    words: list[str] | None = None
    tags: list[str] | None = None
    texts: list[str | None] | None = None
    #: Preference rows: the preferred and the rejected answer to ``messages`` (assistant turns).
    chosen: list[Message] | None = None
    rejected: list[Message] | None = None
    weight: float = 1.0
    difficulty: float | None = None
    language: str | None = None
    task_name: str | None = None
    #: Resolved image references, in the order their markers (``data.images.IMAGE_MARKER``) appear.
    images: list[str] | None = None

    def key(self) -> str:
        """Identity for exact-duplicate removal: two rows the model would see identically."""
        return json.dumps([self.messages, self.text, self.label, self.words, self.tags, self.texts, self.chosen, self.rejected, self.images], sort_keys=True, ensure_ascii=False)

    def label_values(self) -> list[str | int]:
        """The class names this record uses (for building the label map)."""
        if self.tags is not None:
            return list(self.tags)
        if isinstance(self.label, list):
            return list(self.label)
        return [self.label] if isinstance(self.label, (str, int)) and self.texts is None else []


def string_field(fields: Mapping[str, Any], name: str, where: str) -> str:
    value = fields.get(name)
    if value is None:
        raise missing_field(name, fields, where)
    if not isinstance(value, str):
        raise UserError(f"'{name}' must be a string, got {type(value).__name__}", where=where)
    return value


def string_list(fields: Mapping[str, Any], name: str, where: str) -> list[str]:
    value = fields.get(name)
    if value is None:
        raise missing_field(name, fields, where)
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise UserError(f"'{name}' must be a list of strings, got {json.dumps(value)[:60]}", where=where)
    return [str(v) if not isinstance(v, str) else v for v in value]


def number_field(fields: Mapping[str, Any], name: str, where: str, *, what: str) -> float:
    """A finite number; CSV/TSV cells arrive as strings, so numeric strings count."""
    value = fields.get(name)
    if value is None:
        raise missing_field(name, fields, where)
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise UserError(f"{what} '{name}' must be a number, got {json.dumps(value)[:40]}", where=where)
    return number


def missing_field(name: str, fields: Mapping[str, Any], where: str) -> UserError:
    return UserError(
        f"missing column '{name}' (the row has: {', '.join(fields) or 'no fields'})",
        where=where,
        hint=f"add it, or map yours with data.columns: {{their_name: {name}}}",
    )
