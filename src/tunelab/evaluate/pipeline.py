"""The evaluation stage as one call, shared by ``tunelab eval`` and the end of a training run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.evaluate.report import write_report
from tunelab.evaluate.runner import SystemResult, evaluate
from tunelab.evaluate.setup import resolve_setup
from tunelab.recipe import Recipe


def run_eval(
    recipe: Recipe | None,
    overrides: dict[str, Any],
    base: str | None,
    runs: Sequence[str],
    out_dir: str | Path,
    *,
    recipe_dir: str | Path | None = None,
) -> tuple[list[SystemResult], Path]:
    """Resolve settings, evaluate ``base`` (at each k shots) and ``runs``, write the report."""
    if not base and not runs:
        raise UserError("nothing to evaluate", hint="pass --model NAME and/or --run DIR")
    setup = resolve_setup(recipe, overrides, recipe_dir)
    results = evaluate(setup, base, runs)
    return results, write_report(out_dir, setup, results)


def eval_after_training(recipe: Recipe, run_dir: str | Path) -> Path:
    """Evaluate a finished run against its base model as the recipe's ``eval:`` section says.

    Writes ``<run_dir>/eval/eval.json`` (plus the table and predictions) and returns its path.
    """
    _, path = run_eval(recipe, {}, recipe.model.name, [str(run_dir)], Path(run_dir) / "eval")
    return path
