"""The conversion cache: GGUF files are dequantized once and kept as safetensors.

Dequantizing SmolLM2's GGUF takes tens of seconds; a safetensors copy reloads in a few. The
cache lives in ``$TUNELAB_CACHE``, else ``$XDG_CACHE_HOME/tunelab``, else ``~/.cache/tunelab``.
Entries are keyed by the source file's absolute path, size and modification time, so editing or
replacing the GGUF invalidates its copy.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """Where tunelab keeps converted models (created on first use)."""
    if os.environ.get("TUNELAB_CACHE"):
        return Path(os.environ["TUNELAB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tunelab"


def converted_dir(source: Path) -> Path:
    """The cache directory for a converted copy of ``source`` (may not exist yet)."""
    stat = source.stat()
    key = f"{source.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{source.stem}-{digest}"


def is_complete(directory: Path) -> bool:
    """A cache entry is usable only once its marker file exists (written last)."""
    return (directory / ".complete").exists()
