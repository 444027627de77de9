"""``tunelab adapt``: k plain SGD steps from a trained initialisation on a new task's few rows.

This is the step a meta-learned initialisation (``objective: meta``) was trained to make good,
taken exactly as its inner loop took it: SGD without momentum, weight decay or clipping, a
constant learning rate (the run's ``inner_lr`` unless ``--lr`` says otherwise), every row of the
few-shot file in each step. The same command adapts any other starting point (a multi-task run,
a base model) the same way, which is how they are compared.

An adapter run adapts its adapter: the base model gets the run's method again with the run's
trained adapter copied in (``method.init.from_model``), so the k steps move the weights the
meta-learning placed. A run that trained the whole model adapts the whole model. The result is an
ordinary run directory (``train.max_steps`` = k), evaluated as the starting run's recipe says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.data.bad_rows import BadRows
from tunelab.data.readers import read_rows
from tunelab.errors import UserError
from tunelab.methods.artifacts import MODEL_DIR
from tunelab.recipe import Recipe, load_recipe, recipe_from_dict
from tunelab.rundir import final_dir, is_run_dir, read_manifest

#: Data settings of the starting run that say how rows become examples (kept for the new task).
_DATA_KEYS = ("format", "template", "system_prompt", "prompt_template", "completion_template", "max_length", "truncation_side", "columns", "labels", "train_on_prompt")


def adaptation_recipe(
    source: str, data: str, steps: int, *, lr: float | None = None, output_dir: str | None = None, overrides: tuple[str, ...] = ()
) -> Recipe:
    """The recipe of ``steps`` SGD steps from ``source`` (a run directory or any model) on ``data``."""
    path = Path(source).expanduser()
    started = load_recipe(path / "recipe.yaml") if (path / "recipe.yaml").exists() else None
    raw: dict[str, Any] = {"model": {"name": source}, "method": {}}
    if is_run_dir(path):
        manifest = read_manifest(path)
        if not (final_dir(path) / MODEL_DIR).exists():  # adapter-only run: continue its adapter's weights
            method = {key: value for key, value in (manifest.get("method") or {}).items() if value is not None}
            raw = {"model": {"name": manifest["base"]}, "method": {**method, "init": {"from_model": str(path)}}}
    inner_lr = None
    if started is not None:
        written = started.model_dump(mode="json")
        raw["data"] = {key: written["data"][key] for key in _DATA_KEYS if key in written["data"]}
        raw["eval"] = written["eval"]
        if started.objective is not None and started.objective.name == "meta":
            inner_lr = started.objective.inner_lr
        elif started.objective is not None:
            raw["objective"] = written["objective"]
    rows = len(read_rows(data, BadRows("error"), "--data"))
    chosen_lr = lr if lr is not None else inner_lr
    if chosen_lr is None:
        raise UserError("say how large the adaptation steps are", where=source, hint="pass --lr (a meta-learned run uses its objective.inner_lr)")
    raw.setdefault("data", {}).update(train=str(data), validation=None, val_fraction=0.0)
    raw["train"] = {
        "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, "max_grad_norm": None, "schedule": "constant",
        "warmup_steps": 0, "warmup_ratio": 0.0, "lr": chosen_lr, "max_steps": steps, "batch_size": rows, "eval_before": False,
    }
    if output_dir is not None:
        raw["output_dir"] = output_dir
    return recipe_from_dict(raw, overrides=overrides, name=f"adapt-{path.name}")
