"""Write an evaluation's results: eval.json (every number and the settings behind it), a
Markdown comparison table, and one predictions JSONL per system so failures can be read."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tunelab import atomic
from tunelab.evaluate.metrics import settings as metric_settings
from tunelab.evaluate.runner import EvalSetup, SystemResult

LIBRARIES = ("tunelab", "torch", "transformers")


def markdown_table(results: Sequence[SystemResult]) -> str:
    """One row per system: every score, the examples and examples/s."""
    keys = list(dict.fromkeys(key for r in results for key in r.scores))
    header = ["system", *keys, "examples", "examples/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r.system, *(_number(r.scores.get(key)) for key in keys), str(r.examples), f"{r.examples_per_second:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(setup: EvalSetup, results: Sequence[SystemResult]) -> str:
    """The table under a header that says what was measured and how."""
    cfg = setup.cfg
    lines = [
        f"# {cfg.task} evaluation on {setup.data}",
        "",
        f"- prompt template ({cfg.format}): `{json.dumps(cfg.prompt_template)}`",
        f"- few-shot pool: {setup.pool or 'none'}; shots for the base model: {cfg.shots}; seed {cfg.seed}",
        *(f"- {name}: {text}" for name, text in report_dict(setup, results)["metric_settings"].items()),
        "",
    ]
    return "\n".join(lines) + markdown_table(results)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def predictions_file(system: str) -> str:
    """A file name for a system's predictions: its name with anything unsafe turned into '-'."""
    return "predictions-" + re.sub(r"[^A-Za-z0-9._]+", "-", system).strip("-") + ".jsonl"


def _installed_version(name: str) -> str:
    """``name``'s installed version; a source checkout run from ``src/`` (no package metadata) says so
    instead of failing the report after the evaluation is done."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed (run from source)"


def report_dict(setup: EvalSetup, results: Sequence[SystemResult]) -> dict[str, Any]:
    cfg = setup.cfg
    return {
        "task": cfg.task,
        "data": setup.data,
        "pool": setup.pool,
        "settings": {**cfg.model_dump(mode="json"), "chat_template": setup.chat_template},
        "metric_settings": metric_settings(cfg.metric_names()) if cfg.metric_names() else {},
        "versions": {name: _installed_version(name) for name in LIBRARIES},
        "systems": [{**r.summary(), "predictions": predictions_file(r.system)} for r in results],
    }


def write_report(out_dir: str | Path, setup: EvalSetup, results: Sequence[SystemResult]) -> Path:
    """Write eval.json, eval.md and predictions-<system>.jsonl into ``out_dir``; returns eval.json."""
    out = Path(out_dir)
    for r in results:
        atomic.write_text(out / predictions_file(r.system), "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in r.records))
    atomic.write_text(out / "eval.md", markdown_report(setup, results))
    atomic.write_json(out / "eval.json", report_dict(setup, results))
    return out / "eval.json"
