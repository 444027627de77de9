"""Benchmarks of multi-process training: launch a recipe under torchrun once, read its steps back.

Shared by the benchmarks that compare how processes cooperate (``bench/grad_compression.py``,
``bench/strategies.py``): each variant is one recipe, run unless its run directory already holds a
finished run, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any


def train_under_torchrun(recipe: Path, out: Path, *, processes: int = 2, port: int = 29811) -> None:
    """Train ``recipe`` (whose ``output_dir`` is ``out``) on ``processes`` local processes of one
    thread each, unless ``out`` already holds a finished run."""
    if (out / "summary.json").exists():
        return
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", str(port),
                "-m", "tunelab.cli", "train", "--no-progress", str(recipe)]
    subprocess.run(launcher, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def train_records(out: Path) -> list[dict[str, Any]]:
    """The run's per-step training records (metrics.jsonl)."""
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


def mean_step_seconds(records: list[dict[str, Any]], warm: int) -> float:
    """Mean time between consecutive steps, after the first ``warm`` (start-up, first allocations)."""
    return statistics.mean(b["elapsed_s"] - a["elapsed_s"] for a, b in list(zip(records, records[1:]))[warm:])
