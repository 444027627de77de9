"""Per-example fields every data path carries: loss weight, difficulty, language, task name.

They are read in one place for every row format and shape (chat SFT included), so a column the
recipe names is never silently ignored on one path; samplers (curriculum by ``difficulty``,
balancing by ``language``) and objectives (``weight``) read them from each ``Example``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tunelab.data.config import DataConfig
from tunelab.data.records import number_field, string_field
from tunelab.errors import UserError


@dataclass(frozen=True)
class ExampleFields:
    weight: float = 1.0
    difficulty: float | None = None
    language: str | None = None
    task_name: str | None = None


def read_example_fields(fields: Mapping[str, Any], cfg: DataConfig, where: str) -> ExampleFields:
    """The row's ``data.weight_column`` (default 1; negative is an error), ``data.difficulty_column``,
    ``data.language_column`` and ``data.task_column`` values."""
    weight = 1.0
    if cfg.weight_column is not None:
        weight = number_field(fields, cfg.weight_column, where, what="example weight")
        if weight < 0:
            raise UserError(f"example weight '{cfg.weight_column}' is {weight}; weights must be 0 or more", where=where)
    difficulty = number_field(fields, cfg.difficulty_column, where, what="difficulty") if cfg.difficulty_column else None
    language = string_field(fields, cfg.language_column, where) if cfg.language_column else None
    task_name = string_field(fields, cfg.task_column, where) if cfg.task_column else None
    return ExampleFields(weight, difficulty, language, task_name)
