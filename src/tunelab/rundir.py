"""The run directory format: where a run's files live and how its manifest reads and writes.

A run directory is a format, not a training detail: evaluation, compression, generation and the
service read it, so this module sits at the bottom of the stack and imports no model code.

```
RUN_DIR/
  recipe.yaml  data_report.json  metrics.jsonl  summary.json  loss_curve.png
  checkpoints/step-0000040/   trainable.safetensors optimizer.pt rng.pt callbacks.pt state.json
  final/                      tunelab_model.json (the manifest) + what the methods saved + tokenizer
```

The manifest names the base model, the model class ("model_task"), the label names and the method
section, which is everything needed to rebuild the trained model's structure; ``files`` lists
what each method wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab import atomic
from tunelab.errors import UserError

MANIFEST = "tunelab_model.json"
FINAL = "final"
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"step-(\d+)$")


def final_dir(path: Path) -> Path:
    """``path/final`` for a run directory, ``path`` itself for a final folder."""
    return path / FINAL if (path / FINAL / MANIFEST).exists() else path


def is_run_dir(path: Path) -> bool:
    """A run directory with a finished model, or that model's ``final/`` folder."""
    return (path / FINAL / MANIFEST).exists() or (path / MANIFEST).exists()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a run directory (or of its ``final/``)."""
    manifest_path = final_dir(path) / MANIFEST
    try:
        return json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"unreadable run manifest ({exc.__class__.__name__})", where=str(manifest_path)) from None


@contextlib.contextmanager
def writing_final(run_dir: Path, manifest: dict[str, Any]) -> Iterator[Path]:
    """Build ``run_dir/final`` in a temporary folder; the manifest is written last, then the
    folder is renamed into place, so a reader only ever sees a complete final model."""
    with atomic.directory(run_dir / FINAL) as tmp:
        yield tmp
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    directory = run_dir / CHECKPOINTS
    if not directory.exists():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and STEP_DIR.search(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.search(p.name).group(1)))  # type: ignore[union-attr]


def check_writable(path: Path, key: str = "output_dir") -> None:
    """Fail before any heavy work when ``path`` cannot become a run directory: it is a file, or
    it (or the nearest folder that exists above it) cannot be written."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{key} is an existing file, not a folder", where=str(path), hint=f"set {key} to a new folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{key} lies under a file, not a folder", where=str(existing), hint=f"set {key} to a new folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key} cannot be written here (permissions or a read-only mount)", where=str(existing), hint=f"set {key} to a folder you can write")


def holds_a_run(path: Path) -> bool:
    """True when ``path`` already has a run's progress in it (checkpoints, metrics or a final model)."""
    return bool(list_checkpoints(path)) or (path / "metrics.jsonl").exists() or (path / FINAL).exists()


def unique_run_dir(root: Path, stem: str) -> Path:
    """A new, empty ``root/<stem>-<time>-<random>`` created exclusively: two runs started at the
    same second, in one process or many, never share a directory."""
    root.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = root / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue
