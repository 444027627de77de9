"""One trade-off table over runs, their base models and their compressed variants.

Nothing here measures: every number is read from what the training, evaluation and compression
stages already wrote (``summary.json``, ``eval/eval.json``, ``compress/compress.json``), so the
table says exactly what those stages reported and costs nothing to rebuild. A cell is empty when
no stage measured it (a run never compressed has no decode speed), never estimated.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tunelab.compress.measure import WEIGHT_FILES
from tunelab.errors import UserError

#: Score keys where a smaller number is the better model; every other score is higher-is-better.
LOWER_IS_BETTER = frozenset({"perplexity", "nll_per_token", "bits_per_token"})
#: The compressed variant that is the run's own model, merged and measured like the others.
ORIGINAL = "original"
#: The metric charted when no row has task scores: what tunelab compress measures on held-out text.
HELDOUT_PERPLEXITY = "perplexity"


@dataclass
class TradeoffRow:
    """One system: what it scored, what training it cost, what serving it costs."""

    name: str
    kind: str  # "base model", "run" or "compressed"
    path: str
    scores: dict[str, float] = field(default_factory=dict)
    eval_data: str | None = None
    train_seconds: float | None = None
    train_peak_rss_bytes: int | None = None
    trainable_params: int | None = None
    #: What the run saved (an adapter alone is small); for a compressed variant, its weights.
    saved_bytes: int | None = None
    #: The whole model as served (merged weights), from the compression stage's measurement.
    model_bytes: int | None = None
    #: Serving measurements (peak RSS while generating, prompt and decode speed, held-out perplexity).
    peak_rss_bytes: int | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    perplexity: float | None = None
    cpu: str | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot be read as JSON ({exc})", hint="rerun the stage that writes it") from None


def _weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for pattern in WEIGHT_FILES for f in directory.rglob(pattern))


def _serving_fields(row: dict[str, Any]) -> dict[str, Any]:
    """What ``tunelab compress`` measured about one variant (its size, memory and speeds)."""
    return {"model_bytes": row["size_bytes"], "peak_rss_bytes": row["peak_rss_bytes"],
            "prefill_tokens_per_s": row["prefill_tokens_per_s"], "decode_tokens_per_s": row["decode_tokens_per_s"],
            "perplexity": row["perplexity"]}


def _compressed_rows(compress_dir: Path, prefix: str, parent: TradeoffRow | None, base_model: bool) -> list[TradeoffRow]:
    """Rows for the variants in ``compress_dir``. The ``original`` variant of a run is the run's own
    model: its measurements fill the run's row instead of adding one. Variants cost their run's
    training; a base model's variants (``base_model``) cost none; otherwise the cost is unknown."""
    table = _read_json(compress_dir / "compress.json")
    report = compress_dir / "eval" / "eval.json"
    eval_data = _read_json(report)["data"] if report.exists() else None
    if parent is not None:
        training = {"train_seconds": parent.train_seconds, "train_peak_rss_bytes": parent.train_peak_rss_bytes,
                    "trainable_params": parent.trainable_params, "cpu": parent.cpu}
    else:
        training = {"train_seconds": 0.0 if base_model else None}
    rows = []
    for variant in table["rows"]:
        serving = _serving_fields(variant)
        if parent is not None and variant["variant"] == ORIGINAL:
            for key, value in serving.items():
                setattr(parent, key, value)
            parent.scores = parent.scores or variant.get("task", {})
            parent.eval_data = parent.eval_data or eval_data
            continue
        rows.append(TradeoffRow(name=f"{prefix}/{variant['variant']}", kind="compressed", path=str(compress_dir),
                                scores=variant.get("task", {}), eval_data=eval_data if "task" in variant else None,
                                saved_bytes=variant["size_bytes"], **training, **serving))
    return rows


def _run_rows(run_dir: Path, label: str) -> list[TradeoffRow]:
    """The run's row (named ``label``) and its base model's rows from the evaluation after training."""
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        raise UserError(f"{run_dir}: not a finished run (no summary.json)", hint="pass directories that tunelab train wrote")
    summary = _read_json(summary_file)
    saved = Path(summary.get("saved") or run_dir / "final")
    run = TradeoffRow(name=label, kind="run", path=str(run_dir), train_seconds=summary["seconds"],
                      train_peak_rss_bytes=summary.get("peak_rss_bytes") or None, trainable_params=summary["trainable_params"],
                      saved_bytes=_weight_bytes(saved if saved.exists() else run_dir / "final") or None, cpu=summary.get("cpu"))
    rows = [run]
    report_file = run_dir / "eval" / "eval.json"
    if report_file.exists():
        report = _read_json(report_file)
        *bases, own = report["systems"]  # eval after training: the base model (per shot count), then the run
        run.scores, run.eval_data = own["scores"], report["data"]
        rows += [TradeoffRow(name=base["system"], kind="base model", path=base["model"], scores=base["scores"],
                             eval_data=report["data"], train_seconds=0.0) for base in bases]
    return rows


def _trained_run(compress_dir: Path) -> tuple[Path | None, bool]:
    """The run a compression output came from, and whether it is known to be a base model's."""
    table = _read_json(compress_dir / "compress.json")
    if table.get("run") and (Path(table["run"]) / "summary.json").exists():
        return Path(table["run"]), False
    if (compress_dir.parent / "summary.json").exists():
        return compress_dir.parent, False
    # Written by a tunelab that records the run: null means a base model; a run since moved is unknown.
    return None, "run" in table and table["run"] is None


def collect(run_dirs: Sequence[Path], compress_dirs: Sequence[Path] = ()) -> list[TradeoffRow]:
    """Every row for ``run_dirs`` (with their ``compress/`` output) and further compression outputs.

    A compression output made from a run joins that run (listed or not). A base model scored by
    several runs' evaluations on the same data is one row.
    """
    for d in compress_dirs:
        if not (d / "compress.json").exists():
            raise UserError(f"{d}: no compress.json here", hint="pass a directory tunelab compress wrote (RUN/compress or --output)")
    runs = list(dict.fromkeys(d.resolve() for d in run_dirs))
    sources: list[tuple[Path, Path | None, bool]] = [(r / "compress", r, False) for r in runs if (r / "compress" / "compress.json").exists()]
    for d in dict.fromkeys(d.resolve() for d in compress_dirs):
        run, base_model = _trained_run(d)
        if run is not None and run.resolve() not in runs:
            runs.append(run.resolve())
        if all(d != source for source, *_ in sources):
            sources.append((d, run.resolve() if run else None, base_model))
    labels = unique_labels([*runs, *(d for d, run, _ in sources if run is None)])
    rows: list[TradeoffRow] = []
    run_rows: dict[Path, TradeoffRow] = {}
    for run_dir in runs:
        mine = _run_rows(run_dir, labels[run_dir])
        run_rows[run_dir] = mine[0]
        rows += mine
    for compress_dir, run, base_model in sources:
        prefix = labels[run] if run else labels[compress_dir]
        rows += _compressed_rows(compress_dir, prefix, run_rows.get(run) if run else None, base_model)
    unique: dict[tuple[str, str, str, str | None], TradeoffRow] = {}
    for row in rows:  # a base model scored by several runs' evaluations on the same data is one row
        unique.setdefault((row.kind, row.path, row.name, row.eval_data), row)
    return list(unique.values())


def unique_labels(paths: Sequence[Path]) -> dict[Path, str]:
    """Each (resolved) directory's shortest trailing path no other shares (``run`` twice: ``a/run``, ``b/run``)."""
    resolved = list(dict.fromkeys(p.resolve() for p in paths))
    labels = {}
    for path in resolved:
        depth = 1
        while depth < len(path.parts) and any(
            other != path and other.parts[-depth:] == path.parts[-depth:] for other in resolved
        ):
            depth += 1
        labels[path] = "/".join(path.parts[-depth:])
    return labels


def metric_value(row: TradeoffRow, metric: str) -> float | None:
    """The row's score for ``metric``; ``perplexity`` falls back to the compression stage's held-out perplexity."""
    if metric in row.scores:
        return row.scores[metric]
    return row.perplexity if metric == HELDOUT_PERPLEXITY else None


def choose_metric(rows: list[TradeoffRow], metric: str | None) -> str:
    """``metric`` if some row has it, else the first score the rows share (accuracy before others);
    with no task scores at all, the held-out perplexity tunelab compress measured."""
    scored = [row for row in rows if row.scores]
    if not scored and metric in (None, HELDOUT_PERPLEXITY) and any(row.perplexity is not None for row in rows):
        return HELDOUT_PERPLEXITY
    if not scored:
        raise UserError("no row has task scores", hint="evaluate the runs (eval.after_training: true, or tunelab compress with eval data)")
    if metric is not None:
        if not any(metric in row.scores for row in scored):
            known = sorted({key for row in scored for key in row.scores})
            raise UserError(f"--metric {metric!r}: no row has it", hint=f"choose one of {', '.join(known)}")
        return metric
    shared = [key for key in scored[0].scores if all(key in row.scores for row in scored)]
    if not shared:
        raise UserError("the rows share no score", hint="pass --metric NAME")
    return "accuracy" if "accuracy" in shared else shared[0]


def mixed_data_warning(rows: list[TradeoffRow]) -> str | None:
    """A warning when rows were scored on different evaluation files (their metrics do not compare)."""
    sources = sorted({row.eval_data for row in rows if row.eval_data})
    if len(sources) > 1:
        return f"rows were scored on different evaluation data ({', '.join(sources)}): compare metrics only within one"
    return None


def mixed_cpu_warning(rows: list[TradeoffRow]) -> str | None:
    """A warning when the runs were timed on different processors (their training times do not compare)."""
    cpus = sorted({row.cpu for row in rows if row.cpu})
    if len(cpus) > 1:
        return f"the runs were timed on different CPUs ({'; '.join(cpus)}): their training times do not compare"
    return None


MB = 2**20
#: (column header, TradeoffRow field, divisor, format) for the Markdown table.
COLUMNS: list[tuple[str, str, int, str]] = [
    ("train time (s)", "train_seconds", 1, ".1f"),
    ("train peak RAM (MB)", "train_peak_rss_bytes", MB, ".0f"),
    ("trainable params", "trainable_params", 1, ","),
    ("saved (MB)", "saved_bytes", MB, ".1f"),
    ("model size (MB)", "model_bytes", MB, ".1f"),
    ("serving peak RAM (MB)", "peak_rss_bytes", MB, ".0f"),
    ("prefill tok/s", "prefill_tokens_per_s", 1, ".0f"),
    ("decode tok/s", "decode_tokens_per_s", 1, ".1f"),
    ("perplexity", "perplexity", 1, ".2f"),
]


def _cell(value: float | None, divisor: int = 1, spec: str = ".4f") -> str:
    return "" if value is None else format(value / divisor if divisor != 1 else value, spec)


def _table(rows: list[TradeoffRow], metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and text cells: the chosen metric first, empty where nothing measured a value."""
    header = ["system", "kind", metric, *(name for name, *_ in COLUMNS)]
    body = [[row.name, row.kind, _cell(metric_value(row, metric)),
             *(_cell(getattr(row, attribute), divisor, spec) for _, attribute, divisor, spec in COLUMNS)] for row in rows]
    return header, body


def markdown_table(rows: list[TradeoffRow], metric: str) -> str:
    """The table people read, one row per system."""
    header, body = _table(rows, metric)
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def html_table(rows: list[TradeoffRow], metric: str) -> str:
    """The same table as HTML, for the chart page."""
    header, body = _table(rows, metric)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>"


def csv_table(rows: list[TradeoffRow]) -> str:
    """Every field of every row, raw numbers in base units (bytes, seconds), one column per score."""
    score_keys = list(dict.fromkeys(key for row in rows for key in row.scores))
    plain = [f.name for f in fields(TradeoffRow) if f.name != "scores"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, [*plain[:3], *score_keys, *plain[3:]], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values = asdict(row)
        writer.writerow({**{k: ("" if values[k] is None else values[k]) for k in plain}, **row.scores})
    return buffer.getvalue()
