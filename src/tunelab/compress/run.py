"""The compression stage: build every variant, save it, measure it against the original.

Every variant is built and saved before any is measured, so a bad step fails in seconds, not
after minutes of measuring. The original model is saved and measured exactly like the variants (same process set-up, same
text, same settings), so every ratio in the table compares like with like. With an evaluation
set (the recipe's ``eval:`` task, see :func:`task_evaluation`) each variant is also
scored on the task through the evaluation runner, and ``<run>/eval/`` holds that comparison with
every variant's predictions. Rows are appended to ``<run>/compress.jsonl`` as they finish; the
table is written at the end as ``compress.json`` and ``compress.md``.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tunelab import atomic
from tunelab.compress.calibration import read_texts, token_chunks
from tunelab.compress.config import CompressConfig
from tunelab.compress.measure import measure_in_subprocess
from tunelab.compress.steps import apply_steps
from tunelab.compress.store import save_compressed
from tunelab.compress.table import markdown, relative
from tunelab.errors import UserError
from tunelab.evaluate.report import write_report
from tunelab.evaluate.runner import EvalSetup, SystemResult, evaluate
from tunelab.evaluate.setup import resolve_setup
from tunelab.recipe import Recipe

BASELINE = "original"


def task_evaluation(recipe: Recipe) -> EvalSetup | None:
    """The recipe's evaluation task for scoring variants, or None.

    A recipe asks for one by naming ``eval.data`` or by evaluating after training (then on
    ``data.validation`` as that evaluation does); a training validation split alone is not a task
    description (chat rows have no answer field to score). ``compress.evaluate: false`` opts out.
    """
    if not recipe.compress.evaluate or not (recipe.eval.data or recipe.eval.after_training):
        return None
    return resolve_setup(recipe, {})


def run_compression(
    model: nn.Module,
    tokenizer: Any,
    config: CompressConfig,
    run_dir: str | Path,
    *,
    source: str = "",
    seed: int = 0,
    evaluation: EvalSetup | None = None,
    trained_run: Path | None = None,
    echo: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """Compress ``model`` into every variant of ``config`` under ``run_dir``; returns the table rows.

    ``evaluation`` adds the task metrics of every variant (see the module docstring).
    ``trained_run`` (the training run the model came from; None for a base model) is recorded in
    compress.json, so ``tunelab compare`` can charge the variants their run's training.
    """
    if not config.variants:
        raise UserError("the compress section lists no variants", hint="add compress.variants (see examples/compress_smollm2.yaml)")
    if not config.heldout:
        raise UserError("compress.heldout is not set: perplexity needs held-out text", hint="e.g. examples/data/heldout/fortunes.txt")
    run_dir = Path(run_dir)
    names = [v.name for v in config.variants]
    if BASELINE in names or len(set(names)) != len(names):
        raise UserError(f"variant names must be unique and not {BASELINE!r}", where="compress.variants")
    read_texts(config.heldout, config.heldout_texts)  # fail on a bad file before any work
    (run_dir / "compress.jsonl").unlink(missing_ok=True)  # the rows of this run only, like compress.json
    if config.threads:
        torch.set_num_threads(config.threads)
    chunks = None
    if config.calibration:
        chunks = token_chunks(tokenizer, read_texts(config.calibration), config.max_length, config.calibration_chunks)
    settings = {"max_length": config.max_length, "prefill_tokens": config.prefill_tokens,
                "decode_tokens": config.decode_tokens, "repeats": config.repeats, "threads": torch.get_num_threads()}
    base = model.eval()
    built: list[tuple[str, list[dict[str, Any]]]] = []
    scored: dict[str, SystemResult] = {}
    plan = [(BASELINE, []), *((v.name, v.steps) for v in config.variants)]
    for i, (name, steps) in enumerate(plan, 1):
        echo(f"compress: [{i}/{len(plan)}] building {name} ...")
        variant, reports = apply_steps(copy.deepcopy(base), steps, chunks, seed) if steps else (base, [])
        save_compressed(variant, tokenizer, run_dir / "compressed" / name, {"variant": name, "source": source, "steps": reports})
        del variant
        built.append((name, reports))
        if evaluation is not None and name == BASELINE:  # a bad evaluation set fails now, not after every build
            scored[name] = _score(evaluation, run_dir / "compressed" / name, name, echo)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i, (name, reports) in enumerate(built):
        eta = f", about {_minutes((time.perf_counter() - started) / i * (len(built) - i))} left" if i else ""
        echo(f"compress: [{i + 1}/{len(built)}] measuring {name}{eta} ...")
        directory = run_dir / "compressed" / name
        row = {"variant": name, "steps": reports,
               **measure_in_subprocess(directory, Path(config.heldout), config.heldout_texts, settings)}
        if evaluation is not None:
            if name not in scored:
                scored[name] = _score(evaluation, directory, name, echo)
            row["task"] = scored[name].scores
        row["relative"] = relative(row, rows[0] if rows else row)
        if row["loader"] == "tunelab":
            echo(f"compress: {name} has no plain-transformers format; reload it with tunelab.compress.store.load_compressed")
        rows.append(row)
        atomic.append_jsonl(run_dir / "compress.jsonl", row)
        if not config.keep_models:
            shutil.rmtree(directory)
    atomic.write_json(run_dir / "compress.json", {"settings": {**settings, "heldout": config.heldout,
                      "heldout_texts": config.heldout_texts, "calibration": config.calibration},
                      "run": str(trained_run.resolve()) if trained_run else None, "rows": rows})
    atomic.write_text(run_dir / "compress.md", markdown(rows))
    if evaluation is not None:
        write_report(run_dir / "eval", evaluation, list(scored.values()))
    return rows


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _score(evaluation: EvalSetup, directory: Path, name: str, echo: Callable[[str], Any]) -> SystemResult:
    """The saved model in ``directory`` on the evaluation task, reported under the variant's name."""
    echo(f"compress: scoring {name} on the {evaluation.cfg.task} task ...")
    (result,) = evaluate(evaluation, None, [str(directory)], show_progress=False)
    result.system = name
    return result
