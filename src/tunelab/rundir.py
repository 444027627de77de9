"""The run directory format: where a run's files live and how its manifest reads and writes.

A run directory is a format, not a training detail: evaluation, compression, generation and the
service read it, so this module sits at the bottom of the stack and imports no model code.

```
RUN_DIR/
  recipe.yaml  data_report.json  metrics.jsonl  summary.json  loss_curve.png
  checkpoints/step-0000040/   trainable.safetensors optimizer.pt rng.pt callbacks.pt state.json
                              (fsdp.checkpoint: sharded: sharded/ with one DCP file per process
                              instead of trainable.safetensors and the optimizer's moments)
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
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab import atomic
from tunelab.errors import UserError

MANIFEST = "tunelab_model.json"
FINAL = "final"
#: With weight averaging (SWA, EMA), the live weights of the last step, beside the averaged ``final/``.
RAW_FINAL = "final-raw"
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


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder holds (``step-0000040`` -> 40)."""
    return int(STEP_DIR.search(path.name).group(1))  # type: ignore[union-attr]


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    directory = run_dir / CHECKPOINTS
    if not directory.exists():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and STEP_DIR.search(p.name) and (p / "state.json").exists()]
    return sorted(found, key=checkpoint_step)


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


def rewind(run_dir: Path, step: int | None) -> None:
    """Make ``run_dir`` describe a run that stopped at ``step`` (``None``: that never started),
    before ``--resume`` continues it:
    metrics logged after that step (by steps a kill or a full disk threw away) are dropped, as is
    a last line cut short, and temporaries a kill left half-written are deleted."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        kept = [r for r in atomic.read_jsonl(metrics) if step is not None and r.get("step", 0) <= step]
        atomic.write_text(metrics, "".join(json.dumps(r, default=str) + "\n" for r in kept))
    for folder in (run_dir, run_dir / CHECKPOINTS):
        if folder.is_dir():
            atomic.clean_stale(folder)


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


@contextlib.contextmanager
def reporting_disk_full(run_dir: Path, writing: str, needed_bytes: int | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into ``disk_full_error``'s one line."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        if not atomic.is_disk_full(exc):
            raise
        raise disk_full_error(run_dir, writing, needed_bytes) from exc


def disk_full_error(run_dir: Path, writing: str, needed_bytes: int | None = None) -> UserError:
    """The one line a full disk deserves: what was being written, how much it needs, what is
    free, and the step ``--resume`` will continue from (the last complete checkpoint survives)."""
    free = shutil.disk_usage(next(p for p in (run_dir, *run_dir.parents) if p.exists())).free
    need = f"needs about {_megabytes(needed_bytes)}, " if needed_bytes else ""
    checkpoints = list_checkpoints(run_dir)
    resume = (
        f"then `tunelab train --resume {run_dir}` continues from step {checkpoint_step(checkpoints[-1])}"
        if checkpoints else f"then `tunelab train --resume {run_dir}` starts it again (no checkpoint was complete yet)"
    )
    return UserError(
        f"disk full while writing {writing} ({need}{_megabytes(free)} free)", where=str(run_dir),
        hint=f"free space or set output_dir on a larger disk, {resume}",
    )


def _megabytes(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"
