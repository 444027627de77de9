"""Multi-task learning: several datasets, each with its own head and objective, over one shared body.

- **Model**: every task's head model (built as for a single-task run) has its body replaced by
  one shared body, to which the recipe's methods (freezing, LoRA, bottleneck adapters) are
  applied once, so adapters are shared too. The body trains unless ``method.freeze.base`` is
  true (its default when every task's head is a classifier head) or adapters say otherwise.
- **Batches**: every task's examples end to end, each with its ``task`` index; the ``task_mix``
  sampler (``tunelab.train.task_mix``, the default here) puts one task's examples in each
  micro-batch (heads need their own batch shapes) at the rate ``sampler:`` asks for, and
  validation batches never mix tasks. ``train.batch_size`` means examples per micro-batch, as in
  every run. Under DDP different processes may train different tasks in one step, so DDP is told
  that some parameters (other tasks' heads) get no gradient there.
- **Loss**: each batch contributes ``weight × (its task's mean loss) × its examples``; the
  trainer divides by all examples of the step, so tasks with token-level losses do not
  outweigh example-level ones by their token counts.
- **Metrics**: every task's own metrics, prefixed with its name (``eval_<task>_accuracy``).
- **Saving**: ``final/tasks/<task>/`` is a plain transformers model per task (embedding tasks
  also in sentence-transformers layout); ``load_multitask`` loads them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tunelab import rundir
from tunelab.data import DataBundle, DataConfig, DataReport, Example, build_datasets
from tunelab.methods import apply_methods
from tunelab.methods.config import HeadConfig, MethodConfig, TaskConfig
from tunelab.methods.heads import (
    attach_embedding_head,
    check_model_fits,
    head_label_names,
    model_kwargs,
    plan_for,
)
from tunelab.methods.peft_adapters import merge_adapters
from tunelab.methods.pooling import Embedder
from tunelab.models import load_model
from tunelab.models.kinds import model_kind
from tunelab.recipe import Recipe
from tunelab.train.embedding_artifacts import load_embedder, save_embedder
from tunelab.train.objectives import Objective, ObjectiveContext, build_objective
from tunelab.train.objectives.base import Stats
from tunelab.train.prepared import Prepared, head_collate, masking
from tunelab.train.samplers import SAMPLERS, SamplerContext
from tunelab.train.starting_point import load_starting_point
from tunelab.train.task_mix import TaskMixConfig


class MultiTaskModel(torch.nn.Module):
    """One model per task, all sharing ``body``; ``forward(task=name, ...)`` runs that task's model."""

    def __init__(self, body: torch.nn.Module, models: dict[str, torch.nn.Module]):
        super().__init__()
        self.body = body
        self.tasks = torch.nn.ModuleDict(models)

    def forward(self, task: str, **inputs: torch.Tensor) -> Any:
        return self.tasks[task](**inputs)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.body.gradient_checkpointing_enable(**kwargs)


class TaskView:
    """``model`` seen as one task's model, so single-task objectives run unchanged (through DDP too)."""

    def __init__(self, model: torch.nn.Module, task: str):
        self.model, self.task = model, task

    def __call__(self, **inputs: torch.Tensor) -> Any:
        return self.model(task=self.task, **inputs)


class MultiTaskObjective:
    """Dispatches each batch to its task's objective and weights its loss."""

    name = "multi_task"
    collation = "padded"

    def __init__(self, names: list[str], objectives: list[Objective], weights: list[float]):
        self.names, self.objectives, self.weights = names, objectives, weights

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["task_examples"])

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        t = int(batch["task"])
        name, objective = self.names[t], self.objectives[t]
        inner = {k: v for k, v in batch.items() if k not in ("task", "task_examples")}
        loss_sum, stats = objective(TaskView(model, name), inner)
        examples = int(batch["task_examples"])
        loss = self.weights[t] * loss_sum / max(1, objective.units(inner)) * examples
        return loss, {"loss_sum": loss.detach().item(), "examples": examples, **{f"{name}/{k}": v for k, v in stats.items()}}

    def summarize(self, stats: Stats) -> dict[str, float]:
        metrics = {"loss": stats.get("loss_sum", 0.0) / max(1, stats.get("examples", 0))}
        for name, objective in zip(self.names, self.objectives):
            own = {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith(f"{name}/")}
            if own:
                metrics.update({f"{name}_{k}": v for k, v in objective.summarize(own).items()})
        return metrics


def task_plan(task: TaskConfig) -> Any:
    """The head plan of one task, with its objective choice (``method.tasks.<name>.objective``)."""
    return plan_for(task.head, task.objective.name if task.objective is not None else None)


def task_data_config(base: DataConfig, task: DataConfig) -> DataConfig:
    """The task's data section: its own keys over the top-level ``data:`` section's."""
    return DataConfig.model_validate({**base.model_dump(), **task.model_dump(exclude_unset=True)})


def prepare_multitask(recipe: Recipe) -> Any:
    """The ``Prepared`` run for ``method.tasks`` (see the module docstring)."""
    tasks = recipe.method.tasks or {}
    names = list(tasks)
    body_loaded = load_starting_point(recipe, "base")
    tokenizer, is_encoder = body_loaded.tokenizer, model_kind(body_loaded.model.config) == "encoder"
    bundles = {}
    for name, task in tasks.items():
        check_model_fits(task.head, body_loaded.model.config)
        bundles[name] = build_datasets(task_data_config(recipe.data, task.data), tokenizer, shape=task_plan(task).example_shape, seed=recipe.seed)  # type: ignore[arg-type]

    body_method = recipe.method.model_copy(update={"tasks": None, "head": None})
    body = apply_methods(body_loaded.model, body_method, model_task="base", tokenizer_dir=body_loaded.details.get("directory"), tokenizer=body_loaded.tokenizer)
    models, label_names = {}, {}
    for name, task in tasks.items():
        models[name], label_names[name] = _task_model(recipe, task.head, bundles[name], body, is_encoder)
    model = MultiTaskModel(body, models)

    objectives = [
        build_objective(task_plan(t).objective, t.objective, ObjectiveContext(models[n], tokenizer, bundles[n].label_names, bundles[n].train, t.head, seed=recipe.seed))
        for n, t in tasks.items()
    ]
    objective = MultiTaskObjective(names, objectives, [t.weight for t in tasks.values()])
    collates = [head_collate(t.head, masking(t.objective), tokenizer, recipe.seed) for t in tasks.values()]
    train, validation = (tagged([getattr(bundles[n], split) for n in names]) for split in ("train", "validation"))
    mix = recipe.sampler if recipe.sampler is not None else TaskMixConfig()
    sampler = SAMPLERS.get(getattr(mix, "name", "task_mix")).build(mix, SamplerContext(train, recipe.train.batch_size, recipe.seed))

    def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
        task = examples[0].task
        if any(e.task != task for e in examples):
            raise ValueError("a multi-task micro-batch must hold one task's examples (check the sampler)")
        return {**collates[task](examples), "task": torch.tensor(task), "task_examples": torch.tensor(len(examples))}

    def save(run_dir: Path, trained: torch.nn.Module) -> Path:
        return save_multitask_final(run_dir, trained, tokenizer, base=recipe.model.name, method=recipe.method, label_names=label_names)

    data = DataBundle(train, validation, _combined_report(bundles), None)
    return Prepared(model, tokenizer, body_loaded.source, data, objective, collate, save, recipe.train, sampler, uses_all_parameters=False)


def tagged(pools: Sequence[Sequence[Example]]) -> list[Example]:
    """Every task's examples end to end, each marked with its task's index."""
    out = []
    for task, pool in enumerate(pools):
        for example in pool:
            example.task = task
            out.append(example)
    return out


def _task_model(recipe: Recipe, head: HeadConfig, bundle: DataBundle, body: torch.nn.Module, is_encoder: bool) -> tuple[torch.nn.Module, list[str] | None]:
    """This task's model around the shared ``body``; its head's output names."""
    plan = plan_for(head)
    names = head_label_names(head, bundle.label_names)
    if head.type == "embedding":
        return attach_embedding_head(body, head, is_encoder), names
    model = load_starting_point(recipe, plan.model_task, **model_kwargs(head, names)).model
    setattr(model, model.base_model_prefix, body)
    return model, names


def _combined_report(bundles: dict[str, DataBundle]) -> DataReport:
    reports = {name: b.report.as_dict() for name, b in bundles.items()}
    report = DataReport(format="multi-task: " + ", ".join(f"{n} ({r['format']})" for n, r in reports.items()), tasks=reports)
    for key in ("rows_read", "bad_rows_skipped", "duplicates_removed", "truncated", "dropped", "train_examples", "validation_examples", "tokens", "supervised_tokens"):
        setattr(report, key, sum(r[key] for r in reports.values()))
    return report


def save_multitask_final(run_dir: Path, model: MultiTaskModel, tokenizer: Any, *, base: str, method: MethodConfig, label_names: dict[str, list[str] | None]) -> Path:
    """``final/tasks/<task>/``: each task's model as a plain transformers model (adapters merged)."""
    body = merge_adapters(model.body)
    heads = {name: task.head for name, task in (method.tasks or {}).items()}
    manifest = {
        "base": base, "model_task": "multi-task", "label_names": None, "method": method.model_dump(mode="json"), "files": ["tasks/"],
        "tasks": {n: {"model_task": plan_for(h).model_task, "head": h.type, "label_names": label_names[n]} for n, h in heads.items()},
    }
    with rundir.writing_final(run_dir, manifest) as tmp:
        for name, task_model in model.tasks.items():
            directory = tmp / "tasks" / name
            if isinstance(task_model, Embedder):
                task_model.body = body
                save_embedder(task_model, tokenizer, directory)
                continue
            setattr(task_model, task_model.base_model_prefix, body)
            task_model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
        tokenizer.save_pretrained(tmp)
    return run_dir / rundir.FINAL


def load_multitask(run_dir: Path) -> dict[str, torch.nn.Module]:
    """Every task's trained model of a multi-task run (embedding tasks as ``Embedder``)."""
    final = rundir.final_dir(run_dir)
    manifest = rundir.read_manifest(run_dir)
    loaded: dict[str, torch.nn.Module] = {}
    for name, info in manifest["tasks"].items():
        directory = final / "tasks" / name
        loaded[name] = load_embedder(directory)[0] if info["head"] == "embedding" else load_model(str(directory), info.get("model_task") or info["task"]).model.eval()
    return loaded

