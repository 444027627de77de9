"""The conversion cache: GGUF files are dequantized once and kept as safetensors.

Dequantizing SmolLM2's GGUF takes tens of seconds; a safetensors copy reloads in a few. The
cache lives in ``$TUNELAB_CACHE``, else ``$XDG_CACHE_HOME/tunelab``, else ``~/.cache/tunelab``.
Entries are keyed by the source file's content (SHA-256; ~0.1 s for SmolLM2's 98 MB), so the same
file installed in several virtual environments or checkouts shares one copy (keyed by path and
time, one machine had collected 19 copies, 9.6 GB), and editing or replacing the GGUF gets a new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """Where tunelab keeps converted models (created on first use)."""
    if os.environ.get("TUNELAB_CACHE"):
        return Path(os.environ["TUNELAB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tunelab"


def model_fingerprint(name: str, seed: int = 0) -> str:
    """A model's identity for caches of what it computed: its files' names, sizes and times.

    A packaged alias stands for its installed file; a tiny config for its name and seed (it is
    rebuilt identically from them); anything else that is not a path, for its name.
    """
    from tunelab.models.registry import PACKAGED

    location = PACKAGED[name].location() if name in PACKAGED else None
    path = location if location is not None else Path(name).expanduser()
    if not path.exists():
        return f"{name}|seed={seed}"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and "checkpoints" not in p.parts)
    return "|".join(f"{p.relative_to(path.parent)}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files)


def converted_dir(source: Path) -> Path:
    """The cache directory for a converted copy of ``source`` (may not exist yet)."""
    with source.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()[:16]
    return cache_root() / "models" / f"{source.stem}-{digest}"


def is_complete(directory: Path) -> bool:
    """A cache entry is usable only once its marker file exists (written last)."""
    return (directory / ".complete").exists()


@contextlib.contextmanager
def conversion_lock(target: Path) -> Iterator[None]:
    """Hold the one lock that converts into ``target``: a second process waits, then finds the
    copy complete. The OS drops the lock when its holder dies, even by ``kill -9``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def remove_stale_temporaries(target: Path) -> int:
    """Delete what conversions into ``target`` that were killed midway left behind (call it under
    ``conversion_lock``: holding it proves nobody is still writing them); returns the bytes freed."""
    freed = 0
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        freed += sum(f.stat().st_size for f in stale.rglob("*") if f.is_file()) if stale.is_dir() else stale.stat().st_size
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    return freed
