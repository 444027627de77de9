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
    #: True when the process cannot be wound down normally after this error (see ``PeerLost``):
    #: the CLI then ends it right after the line, without running destructors.
    ends_process_now = False

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


class PeerLost(UserError):
    """Another process of a distributed job died or stopped answering.

    The process group is then unusable, and tearing it down can deadlock: freeing the DDP reducer
    joins gloo's worker threads while holding the GIL, and a worker may be waiting for the GIL to
    release a Python object (seen under load: the surviving node printed its line, then hung in
    ``~ProcessGroupGloo``). Everything worth keeping is on disk by then (checkpoints are atomic), so
    the CLI exits at once after the one line.
    """

    ends_process_now = True
