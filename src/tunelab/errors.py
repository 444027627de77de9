"""User-facing errors.

Anything a user can fix (a bad recipe, a missing file, a malformed data row) is raised as a
``UserError`` with a one-line message that says what was wrong, where, and what to do. The CLI
turns it into a single line on stderr and exit code 2; only ``--debug`` shows a traceback.
Programming errors stay ordinary exceptions so they are never disguised as user mistakes.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input, reported as one line and exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.where = where
        self.hint = hint
        self.message = message
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = [f"{self.where}: {self.message}" if self.where else self.message]
        if self.hint:
            parts.append(self.hint)
        return " — ".join(parts).replace("\n", " ")
