"""What a recipe must get right before a run loads its model: checked by ``tunelab train`` first
(a model load takes minutes on real models) and by ``tunelab recipe validate``, so a recipe that
validates is a recipe that starts training."""

from __future__ import annotations

from pathlib import Path

from tunelab.data.config import DataConfig
from tunelab.errors import UserError
from tunelab.recipe import Recipe
from tunelab.report.trackers import check_trackers_installed
from tunelab.rundir import check_writable


def check_trainable(recipe: Recipe) -> None:
    """Where outputs go can be written, every tracker named is installed, the sampler's settings
    fit the data section, and every data section names training data that exists (in every
    stage of a staged recipe, before the first one starts)."""
    if recipe.stages:
        for stage in recipe.stage_recipes:
            check_trainable(stage.model_copy(update={"output_dir": recipe.output_dir}))
        return
    if recipe.output_dir is not None:
        check_writable(Path(recipe.output_dir))
    check_trackers_installed(recipe.train.report_to)
    check_sampler = getattr(recipe.sampler, "check_data", None)
    if check_sampler is not None:
        check_sampler(recipe.data)
    tasks = recipe.method.tasks or {}
    if not tasks:
        _check_data(recipe.data, "data")
    for name, task in tasks.items():
        from tunelab.train.multitask import task_data_config

        _check_data(task_data_config(recipe.data, task.data), f"method.tasks.{name}.data")


def _check_data(data: DataConfig, section: str) -> None:
    for i, source in enumerate(data.mixture or []):
        if not Path(source.train).expanduser().exists():
            raise UserError("data file not found", where=source.train, hint=f"check {section}.mixture.{i}.train")
    if not data.train and not data.mixture:
        raise UserError(
            f"{section}.train is not set: this recipe cannot train",
            hint="point it at a JSONL/JSON/CSV/Parquet file or a folder of them (a recipe only for eval or compress: recipe validate --for eval)",
        )
    for key in ("train", "validation"):
        value = getattr(data, key)
        if value and not Path(value).expanduser().exists():
            raise UserError("data file not found", where=value, hint=f"check {section}.{key}")
