"""The ``data.on_bad_row`` policy in one place: stop at the first bad row, or count and go on."""

from __future__ import annotations

from typing import Literal

from tunelab.errors import UserError

SAMPLES_KEPT = 5  # enough to show a user what kind of rows were skipped without flooding the report


class BadRows:
    """Collects bad rows for the report (``skip``) or re-raises the first one (``error``).

    Every reader and normaliser reports a bad row as a ``UserError`` naming ``file:line``, so the
    message a user sees is the same whichever policy is active. ``setting`` names the recipe key
    that switches to skipping (e.g. ``data.on_bad_row``), so the error can say how to skip.
    """

    def __init__(self, policy: Literal["error", "skip"], setting: str | None = None):
        self.policy = policy
        self.setting = setting
        self.count = 0
        self.samples: list[str] = []

    def handle(self, error: UserError) -> None:
        """Raise ``error`` (policy ``error``) or record it and return (policy ``skip``)."""
        if self.policy == "error":
            if self.setting is None:
                raise error
            hints = [h for h in (error.hint, f"or set {self.setting}: skip to skip such rows") if h]
            raise UserError(error.message, where=error.where, hint="; ".join(hints)) from None
        self.count += 1
        if len(self.samples) < SAMPLES_KEPT:
            self.samples.append(error.one_line())
