"""The base class every recipe section derives from.

Sections live next to the code they configure (``data/config.py``, ``train/config.py``, ...)
and ``recipe.py`` composes them, so a new technique adds its settings without touching a
central file. ``extra="forbid"`` is what turns a misspelt key into an error instead of a
silently ignored setting.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict


class Section(BaseModel):
    """A strict recipe section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _positive_or_auto(value: Any) -> Any:
    """One clear error for a ``number | "auto"`` field instead of one per union branch. Numeric
    strings count as numbers: YAML reads ``1e-3`` (no dot) as a string."""
    if value == "auto":
        return value
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not number > 0:  # also NaN
        raise ValueError("must be a number > 0 or auto")
    return number


#: A positive number, or ``auto`` for a value tunelab chooses (see where the field is resolved).
PositiveOrAuto = Annotated[float | Literal["auto"], BeforeValidator(_positive_or_auto)]
