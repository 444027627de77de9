"""Atomic writes: a reader (or a crash) never sees a half-written file or checkpoint.

Everything tunelab writes into a run directory goes through these helpers: write to a temporary
sibling, flush to disk, then ``os.replace`` (atomic on POSIX). Directories (checkpoints, saved
models) are built under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, with the permissions a plain ``open`` would give."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; outputs are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def temporary_sibling(path: str | Path) -> Path:
    """A new empty directory beside ``path`` that ``directory`` can later put in its place (and
    that ``clean_stale`` removes if the writer is killed first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))


@contextlib.contextmanager
def directory(path: str | Path, started: Path | None = None) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds.

    ``started``: a ``temporary_sibling`` other writers have already filled in part (the shards
    each process of a job writes), used instead of a new one. An existing ``path`` is moved aside
    first and deleted only after the new one is in place, so an interruption leaves either the old
    or the new directory, never a mix.
    """
    path = Path(path)
    tmp = started if started is not None else temporary_sibling(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def clean_stale(folder: Path) -> None:
    """Finish what a kill interrupted in ``folder``: delete half-written temporaries, and put back
    a directory that ``directory`` had moved aside but not yet replaced."""
    for stale in folder.glob(".*.tmp"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    for old in folder.glob(".*.old"):
        original = old.with_name(old.name[1 : -len(".old")])
        if original.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, original)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line; a failed append (disk full) is cut back off, never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as fh:
        end = fh.seek(0, os.SEEK_END)
        try:
            fh.write((json.dumps(record, default=str) + "\n").encode("utf-8"))
            fh.flush()
        except BaseException:
            fh.truncate(end)
            raise


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The complete records of a JSONL log; a last line cut short by a kill is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


#: Errors a full disk (or an exhausted quota) raises.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException | None) -> bool:
    """True when ``exc`` comes from a full disk. ``torch.save`` reports it as an opaque
    ``RuntimeError`` with the ``OSError`` as its context, and safetensors only in its message,
    so the whole chain is searched."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(marker in str(exc) for marker in ("No space left on device", "Disk quota exceeded", "os error 28")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
