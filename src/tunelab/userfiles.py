"""Reading a file a user named, with the one-line errors every reader should give."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import UserError


def read_user_text(path: str | Path, what: str = "file") -> str:
    """UTF-8 text of ``path``; a missing or unreadable file is a ``UserError`` naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} not found", where=str(path), hint="check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {what} as UTF-8 text ({exc.__class__.__name__})", where=str(path)) from None
