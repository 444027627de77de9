"""Multi-stage recipes: ``stages:`` trains an ordered list of recipe parts in one run directory,
each stage starting from the previous stage's model.

```
RUN_DIR/
  recipe.yaml               the recipe as written, stages included
  stages/01-<name>/         an ordinary run directory per stage; its recipe.yaml names the
  stages/02-<name>/         previous stage's folder as model.name, so it is also the recipe
  ...                       that reproduces the stage by hand
  final -> stages/NN-<name>/final   the last stage's model: RUN_DIR loads like any run
  summary.json              the last stage's summary, with every stage's line and the total time
```

A stage is an ordinary run (``run_training``), so everything a run does (evaluation after
training, compression, checkpoints, bit-exact resume) a stage does. ``--resume RUN_DIR`` skips
the stages that finished, resumes inside the one that was interrupted and starts the ones after it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab import atomic
from tunelab.errors import UserError
from tunelab.recipe import Recipe, copy_recipe, dump_recipe, load_recipe
from tunelab.rundir import FINAL, holds_a_run, unique_run_dir
from tunelab.train.resume_rules import resume_changes

STAGES_DIR = "stages"


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    """Where stage ``index`` (0-based) of a staged run lives."""
    return run_dir / STAGES_DIR / f"{index + 1:02d}-{name}"


def stage_plan(recipe: Recipe, run_dir: Path) -> list[Recipe]:
    """Each stage's recipe as it runs: its folder as ``output_dir`` and the previous stage's
    folder (the recipe's own model for the first) as ``model.name``."""
    planned, previous = [], recipe.model.name
    for index, (spec, stage) in enumerate(zip(recipe.stages or [], recipe.stage_recipes, strict=True)):
        folder = stage_dir(run_dir, index, spec.name)
        planned.append(copy_recipe(stage, output_dir=str(folder), model=stage.model.model_copy(update={"name": previous})))
        previous = str(folder.resolve())
    return planned


def run_stages(
    recipe: Recipe, train_one: Callable[..., Any], from_record: Callable[[dict[str, Any]], Any], *, resume: bool, show_progress: bool, **run_options: Any
) -> Any:
    """Train every stage of ``recipe`` in order with ``train_one`` (``run_training``); returns the
    last stage's summary (the cancelled stage's, when one was cancelled). ``from_record`` turns a
    finished stage's ``summary.json`` back into a summary (a resume that had only bookkeeping left)."""
    run_dir = _run_dir(recipe, resume)
    if resume and (run_dir / "summary.json").exists():
        raise UserError("the staged run is complete: nothing to resume", where=str(run_dir), hint=f"its model is in {run_dir / FINAL}")
    stages = stage_plan(recipe, run_dir)
    if resume:
        _check_resume(recipe, run_dir, stages)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    summaries: list[dict[str, Any]] = []
    summary: Any = None
    for index, stage in enumerate(stages):
        folder = Path(stage.output_dir or "")
        done = folder / "summary.json"
        if done.exists():
            summaries.append(json.loads(done.read_text()))
            continue
        print(f"\n== stage {index + 1}/{len(stages)}: {folder.name} (from {stage.model.name}) ==", flush=True)
        try:
            summary = train_one(stage, resume=(folder / "recipe.yaml").exists(), show_progress=show_progress, **run_options)
        except KeyboardInterrupt:
            print(f"continue the staged run with: tunelab train --resume {run_dir}", flush=True)
            raise
        if summary.stop_reason == "cancelled":
            return summary
        summaries.append(summary.as_dict())
    _link_final(run_dir, Path(stages[-1].output_dir or ""))
    total = {**summaries[-1], "run_dir": str(run_dir), "seconds": round(sum(s["seconds"] for s in summaries), 2),
             "stages": [_stage_line(s) for s in summaries]}
    atomic.write_json(run_dir / "summary.json", total)
    print(f"\nstaged run: {run_dir} ({len(stages)} stages, {total['seconds']:.0f}s); final model: {run_dir / FINAL}", flush=True)
    return summary if summary is not None else from_record(summaries[-1])


def _run_dir(recipe: Recipe, resume: bool) -> Path:
    if recipe.output_dir is not None:
        run_dir = Path(recipe.output_dir)
        if not resume and (holds_a_run(run_dir) or (run_dir / STAGES_DIR).exists()):
            raise UserError(
                "run directory already holds a run (a directory belongs to one run)", where=str(run_dir),
                hint=f"continue it with: tunelab train --resume {run_dir}, or set output_dir to a new folder",
            )
        return run_dir
    if resume:
        raise UserError("resuming needs the run directory", hint="use tunelab train --resume RUN_DIR")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("a staged run on several processes needs one output_dir for all of them", where="output_dir", hint="set output_dir")
    return unique_run_dir(Path("runs"), recipe.name)


def _check_resume(recipe: Recipe, run_dir: Path, stages: list[Recipe]) -> None:
    """The stages must be the ones the run started with; a finished stage's recipe is held to the
    same rules as any resumed run's (an unfinished one is checked when it resumes)."""
    if not (run_dir / "recipe.yaml").exists():
        raise UserError("nothing to resume: no run was started here (no recipe.yaml)", where=str(run_dir), hint="train without --resume")
    started = load_recipe(run_dir / "recipe.yaml")
    if [s.name for s in started.stages or []] != [s.name for s in recipe.stages or []]:
        raise UserError("resuming would change the run's list of stages", where=str(run_dir), hint="resume with the run's own recipe, or start a new run")
    for stage in stages:
        folder = Path(stage.output_dir or "")
        if (folder / "summary.json").exists():
            resume_changes(folder, stage)


def _link_final(run_dir: Path, last: Path) -> None:
    """``RUN_DIR/final`` -> the last stage's ``final/`` (relative, so the run directory can move)."""
    link = run_dir / FINAL
    tmp = run_dir / f".{FINAL}.link.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(last / FINAL, run_dir), tmp)
    os.replace(tmp, link)


def _stage_line(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("run_dir", "stop_reason", "steps", "seconds", "final_train_loss", "eval_before", "eval_after", "saved")
    return {key: summary.get(key) for key in keys}

