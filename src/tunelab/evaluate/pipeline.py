"""The evaluation stage as one call, shared by ``tunelab eval`` and the end of a training run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.evaluate.ensemble import check_ensemble, ensemble
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
    reuse_base_scores: bool = True,
) -> tuple[list[SystemResult], Path]:
    """Resolve settings, evaluate ``base`` (at each k shots; cached scores reused unless
    ``reuse_base_scores`` is off) and ``runs`` (and, with ``eval.ensemble``, the runs combined as
    one more row), write the report."""
    if not base and not runs:
        raise UserError("nothing to evaluate", hint="pass --model NAME and/or --run DIR")
    setup = resolve_setup(recipe, overrides, recipe_dir)
    if setup.cfg.ensemble:
        check_ensemble(setup.cfg, len(runs))
    results = evaluate(setup, base, runs, reuse_base_scores=reuse_base_scores)
    if setup.cfg.ensemble:
        results.append(ensemble(results[len(results) - len(runs):], setup.cfg.ensemble, setup.cfg))
    return results, write_report(out_dir, setup, results)


def eval_after_training(recipe: Recipe, run_dir: str | Path) -> Path:
    """Evaluate a finished run against its base model as the recipe's ``eval:`` section says.

    A ``classification`` task scores the run's trained head; the base model has no such head
    (one would be drawn at random), so it gets no row: the run's own ``eval_before`` is the
    untrained figure. Writes ``<run_dir>/eval/eval.json`` (plus the table and predictions) and
    returns its path.
    """
    single = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"ensemble": None})})  # one run: no ensemble
    base = None if recipe.eval.task == "classification" else recipe.model.name
    _, path = run_eval(single, {}, base, [str(run_dir)], Path(run_dir) / "eval")
    return path
