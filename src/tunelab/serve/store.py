"""The service's records: one SQLite database (WAL) under the data directory.

Every object the API returns (file, job, event, checkpoint, model) is stored as its JSON body in
one table, keyed by its id, with the parent it belongs to (a job's events) and the API key that
owns it. Insertion order (``seq``) is the list order, and OpenAI's cursor paging (``after`` = the
id of the last item seen) becomes "seq beyond that item's seq". WAL lets the worker write events
while requests read. A lock file keeps a second server off the same data directory.
"""

from __future__ import annotations

import fcntl
import json
import secrets
import sqlite3
import string
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.errors import UserError

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 24) -> str:
    """``prefix`` + random letters and digits (OpenAI's ids: ``file-…``, ``ftjob-…``)."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def now() -> int:
    return int(time.time())


class Store:
    """Thread-safe JSON records with cursor paging; one per data directory."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(data_dir / "serve.lock", "w")  # noqa: SIM115 - held for the store's lifetime
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise UserError(f"another tunelab server is using {data_dir}", where="--data-dir", hint="stop it, or give this one its own --data-dir") from None
        self._db = sqlite3.connect(data_dir / "tunelab.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, "
            "id TEXT NOT NULL UNIQUE, parent TEXT, owner TEXT, data TEXT NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS by_kind ON records (kind, parent, seq)")
        self._mutex = threading.Lock()

    def close(self) -> None:
        with self._mutex:
            self._db.close()
        self._lock_file.close()

    def insert(self, kind: str, body: dict[str, Any], *, parent: str | None = None, owner: str | None = None) -> dict[str, Any]:
        with self._mutex:
            self._db.execute("INSERT INTO records (kind, id, parent, owner, data) VALUES (?, ?, ?, ?, ?)",
                             (kind, body["id"], parent, owner, json.dumps(body)))
        return body

    def get(self, kind: str, ident: str, *, owner: str | None = None) -> dict[str, Any] | None:
        with self._mutex:
            row = self._db.execute("SELECT data, owner FROM records WHERE kind = ? AND id = ?", (kind, ident)).fetchone()
        if row is None or (owner is not None and row[1] not in (None, owner)):
            return None
        return json.loads(row[0])

    def owner_of(self, kind: str, ident: str) -> str | None:
        with self._mutex:
            row = self._db.execute("SELECT owner FROM records WHERE kind = ? AND id = ?", (kind, ident)).fetchone()
        return None if row is None else row[0]

    def update(self, kind: str, ident: str, changes: dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Merge ``changes`` (or apply a function to the body) atomically; returns the new body."""
        with self._mutex:
            row = self._db.execute("SELECT data FROM records WHERE kind = ? AND id = ?", (kind, ident)).fetchone()
            if row is None:
                raise KeyError(ident)
            body = json.loads(row[0])
            body = changes(body) if callable(changes) else {**body, **changes}
            self._db.execute("UPDATE records SET data = ? WHERE kind = ? AND id = ?", (json.dumps(body), kind, ident))
        return body

    def delete(self, kind: str, ident: str) -> None:
        with self._mutex:
            self._db.execute("DELETE FROM records WHERE kind = ? AND id = ?", (kind, ident))

    def all(self, kind: str, *, parent: str | None = None, owner: str | None = None, newest_first: bool = True) -> list[dict[str, Any]]:
        query = "SELECT data FROM records WHERE kind = ?"
        args: list[Any] = [kind]
        if parent is not None:
            query, args = query + " AND parent = ?", [*args, parent]
        if owner is not None:
            query, args = query + " AND (owner IS NULL OR owner = ?)", [*args, owner]
        query += " ORDER BY seq " + ("DESC" if newest_first else "ASC")
        with self._mutex:
            rows = self._db.execute(query, args).fetchall()
        return [json.loads(row[0]) for row in rows]

    def page(self, kind: str, *, after: str | None, limit: int, parent: str | None = None, owner: str | None = None,
             newest_first: bool = True, keep: Callable[[dict[str, Any]], bool] | None = None) -> tuple[list[dict[str, Any]], bool]:
        """One page of a list in list order, starting after the item with id ``after``; and whether
        more follow (OpenAI's ``has_more``)."""
        items = [b for b in self.all(kind, parent=parent, owner=owner, newest_first=newest_first) if keep is None or keep(b)]
        if after is not None:
            ids = [b["id"] for b in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        return items[:limit], len(items) > limit
