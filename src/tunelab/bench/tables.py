"""What benchmark scripts over seeds and configs share: a results file that a rerun continues,
and how a figure measured over several seeds is printed."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

#: Recipe overrides for a benchmark whose seeds are measured one session at a time, on whichever
#: CPU that session has: ``precision: auto`` trains in bf16 where the CPU has bf16 units and in fp32
#: elsewhere, so a seed from another machine would be another protocol. fp32 is what every CPU runs.
SAME_ON_EVERY_CPU = ("train.precision=fp32",)


def mean_std(values: list[float]) -> str:
    """``mean ± sample std`` to three decimals (the value alone for a single seed)."""
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def run_missing(
    path: Path, plan: Iterable[Hashable], key: Callable[[dict[str, Any]], Hashable], run: Callable[[Any], dict[str, Any]],
    header: dict[str, Any], report: Callable[[dict[str, Any]], str],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run every item of ``plan`` whose row (``key(row)``) is not in ``path`` yet, rewriting the file
    (``header`` + all rows, anything else already there kept) after each, so a killed benchmark
    continues where it stopped. Returns what was in the file before and every row."""
    saved = json.loads(path.read_text()) if path.exists() else {}
    rows: list[dict[str, Any]] = saved.get("rows", [])
    done = {key(row) for row in rows}
    for item in plan:
        if item in done:
            continue
        rows.append(run(item))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**saved, **header, "rows": rows}, indent=2) + "\n")
        print(report(rows[-1]), flush=True)
    return saved, rows


def write_results(out_dir: Path, name: str, meta: dict[str, Any], rows: list[dict[str, Any]], note: str, table: list[str]) -> None:
    """``<out_dir>/<name>.json`` (``meta`` + every row) and ``<name>.md`` (the note, then the table); prints the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(note + "\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))
