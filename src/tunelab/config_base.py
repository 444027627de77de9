"""The base class every recipe section derives from.

Sections live next to the code they configure (``data/config.py``, ``train/config.py``, ...)
and ``recipe.py`` composes them, so a new technique adds its settings without touching a
central file. ``extra="forbid"`` is what turns a misspelt key into an error instead of a
silently ignored setting.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A strict recipe section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
