"""What a resumed run may change: the rules ``--resume`` applies to a run directory's recipe.

A resumed run continues the steps it already took, so a setting that changes what those steps
meant (data, method, learning rate) is refused; speed, bookkeeping, a longer schedule and what
happens after training may change, and each change is logged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.recipe import Recipe, load_recipe
from tunelab.rundir import list_checkpoints
from tunelab.train import auto_settings

#: Settings a resumed run may change without changing what its finished steps meant: speed,
#: bookkeeping, a longer schedule, and what happens after training. ddp and fsdp compute the same
#: steps, and checkpoints hold full-size tensors either way, so a run may switch between them.
SAFE_ON_RESUME = (
    "train.threads", "train.max_steps", "train.epochs", "train.log_every", "train.save_every", "train.keep_last",
    "train.eval_every", "train.compile", "train.fuse_mlp", "train.fuse_qkv", "train.fuse_blocks", "train.distributed.strategy", "train.distributed.fsdp.", "train.distributed.tp.", "train.distributed.pp.", "eval.", "compress.", "output_dir",
)


def resume_changes(run_dir: Path, recipe: Recipe, processes: int | None = None) -> dict[str, list[Any]]:
    """``{key: [then, now]}`` for every setting that differs from the recipe the run started
    with; a one-line error listing them when any is not safe to change on resume.

    ``processes``: how many data-parallel processes (those that draw different batches; under
    tensor parallelism fewer than the processes) resume it. The global batch (``batch_size x
    grad_accum x processes``) is what a step means, so on a different number of them than the
    last checkpoint's the per-process batch must change to keep it, and may change only so.
    """
    started = load_recipe(run_dir / "recipe.yaml")
    then, now = _flat(started.model_dump(mode="json")), _flat(recipe.model_dump(mode="json"))
    changed = {k: [then.get(k), now.get(k)] for k in sorted(then.keys() | now.keys()) if then.get(k) != now.get(k)}
    batch_kept = processes is not None and _same_global_batch(run_dir, started, recipe, processes)
    batch_keys = ("train.batch_size", "train.grad_accum")
    unsafe = [k for k in changed if not any(k == s or (s.endswith(".") and k.startswith(s)) for s in SAFE_ON_RESUME)
              and not (batch_kept and k in batch_keys)]
    if unsafe:
        shown = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in unsafe[:4]) + (" ..." if len(unsafe) > 4 else "")
        raise UserError(
            f"resuming would change what the finished steps trained: {shown}", where=str(run_dir),
            hint="resume with the run's own recipe, or start a new run; safe to change: " + ", ".join(s.rstrip(".") for s in SAFE_ON_RESUME),
        )
    return {k: v for k, v in changed.items() if k != "output_dir"}


def extends_schedule(recipe: Recipe, changes: dict[str, list[Any]], run_dir: Path) -> bool:
    """True when a resume asks for more training than the run was set to do, counted the same
    way (a larger ``train.max_steps``, or a larger ``train.epochs`` when no step limit is set;
    ``auto`` counts as the passes it gave the run's training split)."""
    if "train.max_steps" in changes:
        then, now = changes["train.max_steps"]
        return then is not None and now is not None and now > then
    if recipe.train.max_steps is None and "train.epochs" in changes:
        then, now = (_epoch_count(value, run_dir) for value in changes["train.epochs"])
        return now > then
    return False


def _epoch_count(epochs: float | str, run_dir: Path) -> float:
    if epochs != "auto":
        return float(epochs)
    report = json.loads((run_dir / "data_report.json").read_text())
    return float(auto_settings.auto_epochs(report["train_examples"]))


def _same_global_batch(run_dir: Path, started: Recipe, recipe: Recipe, processes: int) -> bool:
    """Whether resuming on ``processes`` keeps the last checkpoint's global batch; a one-line error
    with the per-process batch that would keep it when the number of processes changed and it does
    not. Checkpoints from before the number was recorded: True only with the batch unchanged."""
    last = list_checkpoints(run_dir)
    state = json.loads((last[-1] / "state.json").read_text()) if last else {}
    before = state.get("data_parallel", state.get("processes"))  # checkpoints before tensor parallelism: every process drew
    now_batch = recipe.train.batch_size * recipe.train.grad_accum * processes
    if before is None:
        return False
    then_batch = started.train.batch_size * started.train.grad_accum * before
    if now_batch != then_batch:
        if before == processes:
            return False  # a batch change on the same processes: the ordinary rule refuses it
        per_process = then_batch / (processes * recipe.train.grad_accum)
        raise UserError(
            f"resuming on {processes} data-parallel process{'es' * (processes != 1)} instead of {before} changes the global batch "
            f"from {then_batch} to {now_batch} examples per step",
            where=str(run_dir),
            hint=f"keep batch_size x grad_accum x processes = {then_batch}: e.g. train.batch_size={per_process:g}" if per_process.is_integer()
            else f"keep batch_size x grad_accum x processes = {then_batch} (train.batch_size, train.grad_accum)",
        )
    return True


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out
