"""The training stage and the job API: recipe in, run directory out.

load model -> apply methods -> build data -> objective -> Trainer.fit -> save final -> summary.
The CLI, the service and tests all call ``run_training``; nothing is reachable from only one.
A program passes extra ``callbacks``, an ``events`` sink that receives every metrics record as it
is written (and a final ``{"type": "done"}`` record with the summary), and a ``cancel`` token
(``threading.Event``) checked after every step: a cancelled run writes a checkpoint and stops, and
``resume=True`` continues it bit-exactly.

One run per process at a time: torch's thread count and global RNG are process state. A run sets
both at its start and restores the thread count at its end, so runs one after another in a
process are independent; to run several at once, use ``tunelab.jobs.run_in_subprocess``.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

import tunelab.compress.callbacks  # noqa: F401  (registers gradual pruning, lottery ticket, QAT)
import tunelab.train.free_cores  # noqa: F401  (registers the thread count that follows the free cores)
from tunelab import atomic
from tunelab.data.build import losses_summary
from tunelab.errors import UserError
from tunelab.hardware import (
    best_device,
    configure_matmul,
    configure_threads,
    cpu_model_name,
    device_name,
    peak_device_bytes,
    peak_rss_bytes,
    resolve_precision,
)
from tunelab.methods import trainable_summary
from tunelab.methods.artifacts import merge_methods
from tunelab.recipe import Recipe, copy_recipe, dump_recipe, load_recipe
from tunelab.report.trackers import Trackers, final_scalars, open_trackers
from tunelab.rundir import (
    RAW_FINAL,
    checkpoint_step,
    holds_a_run,
    list_checkpoints,
    reporting_disk_full,
    rewind,
    unique_run_dir,
)
from tunelab.train.callbacks import Callback, callbacks_for
from tunelab.train.distributed import World, init_world, lost_peers_reported, shutdown
from tunelab.train.loop import (
    CancelToken,
    EventSink,
    TooFewExamples,
    Trainer,
    TrainResult,
)
from tunelab.train.preflight import check_trainable
from tunelab.train.prepare import prepare
from tunelab.train.prepared import Prepared
from tunelab.train.process_layout import data_parallel_size
from tunelab.train.resume_rules import extends_schedule, resume_changes
from tunelab.train.stages import run_stages
from tunelab.train.weight_average import load_into


@dataclass
class RunSummary(TrainResult):
    """What the loop reported plus what the run was: the one-screen summary and ``summary.json``."""

    run_dir: str = ""
    model: str = ""
    precision: str = ""
    trainable_params: int = 0
    total_params: int = 0
    train_examples: int = 0
    validation_examples: int = 0
    tokens_per_s: float = 0.0
    #: The training process's resident-memory high-water mark (model load included), measured.
    peak_rss_bytes: int = 0
    #: Every process's high-water mark, in rank order (under torchrun processes hold different parts).
    peak_rss_bytes_per_process: list[int] = field(default_factory=list)
    #: The processor the run's timings were measured on (figures on another CPU do not compare).
    cpu: str = ""
    #: Where the model trained: ``cpu`` or the accelerator's model (``cuda:0 NVIDIA H200``).
    device: str = "cpu"
    #: The accelerator's allocation high-water mark (torch.cuda.max_memory_allocated); 0 on the CPU.
    peak_device_bytes: int = 0
    #: The schedule the run used: the recipe's numbers, or what ``auto`` chose (tunelab.train.auto_settings).
    lr: float = 0.0
    epochs: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    saved: str = ""
    #: What ``supervised_units`` counts: the objective's loss units (tokens, examples, preference pairs).
    unit_name: str = "supervised"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, without the per-step history (that is metrics.jsonl)."""
        record = asdict(self)
        record.pop("history")
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RunSummary:
        """A summary read back from ``summary.json`` (no per-step history)."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in names})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run_training(
    recipe: Recipe,
    *,
    resume: bool = False,
    show_progress: bool = True,
    callbacks: Sequence[Callback] = (),
    events: EventSink | None = None,
    cancel: CancelToken | None = None,
) -> RunSummary:
    """Train as ``recipe`` says; with ``resume``, continue from the run directory's last checkpoint.

    Without ``output_dir`` the run gets a new unique directory under ``runs/`` (the summary's ``run_dir``).
    A recipe with ``stages`` trains them in order in one run directory (``tunelab.train.stages``).
    """
    check_trainable(recipe)  # before the model loads: minutes on a real model
    if recipe.stages:
        return run_stages(recipe, run_training, RunSummary.from_record, resume=resume, show_progress=show_progress,
                          callbacks=callbacks, events=events, cancel=cancel)
    device = best_device()
    world = init_world(device, recipe.train.distributed.timeout_s)
    if recipe.output_dir is None:
        if resume:
            raise UserError("resuming needs the run directory", hint="pass output_dir (or use tunelab train --resume RUN_DIR)")
        recipe = copy_recipe(recipe, output_dir=str(unique_run_dir(Path("runs"), recipe.name)) if world.is_main else None)
        recipe = copy_recipe(recipe, output_dir=world.broadcast_object(recipe.output_dir))
    threads_before = torch.get_num_threads()
    try:
        with reporting_disk_full(Path(recipe.output_dir), "the run's outputs"), lost_peers_reported(world, Path(recipe.output_dir)):
            summary = _run(recipe, Path(recipe.output_dir), device, world, resume, show_progress, list(callbacks), events, cancel)
        if events is not None and world.is_main:
            events({"type": "done", **summary.as_dict()})
        return summary
    finally:
        torch.set_num_threads(threads_before)
        shutdown(world)


def _run(
    recipe: Recipe, run_dir: Path, device: torch.device, world: World, resume: bool, show_progress: bool,
    extra_callbacks: list[Callback], events: EventSink | None, cancel: CancelToken | None,
) -> RunSummary:
    threads = configure_threads(recipe.train.threads)
    precision = resolve_precision(recipe.train.precision, device)
    configure_matmul(device, recipe.train.tf32)
    seed_everything(recipe.seed)
    resume_from, changes = None, {}
    if resume:
        resume_from, changes = _resume_point(recipe, run_dir, world)
    elif world.is_main and holds_a_run(run_dir):
        raise UserError(
            "run directory already holds a run (a directory belongs to one run)", where=str(run_dir),
            hint=f"continue it with: tunelab train --resume {run_dir}, or set output_dir to a new folder",
        )

    say = print if world.is_main else (lambda *a, **k: None)
    say(f"tunelab: loading {recipe.model.name} ...", flush=True)
    prepared = prepare(recipe, device)
    model, data = prepared.model, prepared.data
    written = recipe  # recipe.yaml keeps what the user wrote ("auto"); the run uses the numbers
    recipe = recipe.model_copy(update={"train": prepared.train_cfg})
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    summary_params = trainable_summary(model)

    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # the recipe a run started with stays its record; resumes log their changes
            atomic.write_text(run_dir / "recipe.yaml", dump_recipe(written))
        elif changes:
            atomic.append_jsonl(run_dir / "resume_changes.jsonl", {"from_step": checkpoint_step(resume_from) if resume_from else 0, "changes": changes})
        atomic.write_json(run_dir / "data_report.json", data.report.as_dict())
        processes = f" | {recipe.train.distributed.strategy} over {world.size} processes" if world.distributed else ""
        say(f"model: {prepared.source} | {summary_params} | precision {precision.name} ({precision.reason}) | threads {threads}{processes}")
        say(_data_line(data.report.as_dict()))
        for note in prepared.notes:
            say(f"train: {note}")

    trackers = Trackers([])
    if world.is_main and recipe.train.report_to:
        trackers = open_trackers(recipe.train.report_to, run_dir, recipe.name, written.model_dump(mode="json"), dump_recipe(written),
                                 start_step=checkpoint_step(resume_from) if resume_from else 0)
        say(f"report_to: {trackers.describe()}")
    try:
        trainer = Trainer(
            model=model, objective=prepared.objective, train=data.train, validation=data.validation, cfg=prepared.train_cfg,
            collate=prepared.collate, precision=precision, run_dir=run_dir, seed=recipe.seed, world=world,
            callbacks=[*callbacks_for(recipe), *extra_callbacks], device=device, show_progress=show_progress, compile=recipe.train.compile, fuse_mlp=recipe.train.fuse_mlp, fuse_qkv=recipe.train.fuse_qkv, fuse_blocks=recipe.train.fuse_blocks,
            sampler=prepared.sampler, events=trackers.chain(events), cancel=cancel, uses_all_parameters=prepared.uses_all_parameters,
        )
    except TooFewExamples as exc:
        raise UserError(exc.message, where=recipe.data.train, hint=f"{exc.hint} ({losses_summary(data.report)})") from None
    result = trainer.fit(resume_from)
    saved = ""
    unit = getattr(prepared.objective, "unit_name", "supervised")
    if result.stop_reason == "cancelled":
        say(f"\ncancelled at step {result.steps}; continue with: tunelab train --resume {run_dir}")
        return _summary(recipe, run_dir, device, prepared.source, precision.name, summary_params, data, result, saved, unit)
    if result.stop_reason == "interrupted":
        say(f"\ninterrupted at step {result.steps}; continue with: tunelab train --resume {run_dir}")
        raise KeyboardInterrupt
    model = trainer.plain_model()  # split over processes: gathered on the main process, None on the others (all take part)
    if world.is_main:
        with reporting_disk_full(run_dir, "the final model"):
            saved = str(_save_final(prepared, model, run_dir, trainer.averaged_weights()))
    world.barrier()
    peaks = world.all_gather_object(peak_rss_bytes())
    summary = _summary(recipe, run_dir, device, prepared.source, precision.name, summary_params, data, result, saved, unit, peaks)
    if world.is_main:
        atomic.write_json(run_dir / "summary.json", summary.as_dict())
        from tunelab.report.plots import plot_training

        plot_training(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        say(format_summary(summary))
        if recipe.eval.after_training:
            from tunelab.evaluate.pipeline import eval_after_training

            report = eval_after_training(recipe, run_dir)
            say(f"\n{(report.parent / 'eval.md').read_text() if (report.parent / 'eval.md').exists() else report}")
        if recipe.compress.variants:
            from tunelab.compress.run import run_compression, task_evaluation

            plain = merge_methods(model, for_compression=True)  # compression works on plain weights
            run_compression(plain, prepared.tokenizer, recipe.compress, run_dir / "compress", source=str(run_dir), seed=recipe.seed,
                            evaluation=task_evaluation(recipe), trained_run=run_dir, echo=say)
            say((run_dir / "compress" / "compress.md").read_text())
        trackers.finish(final_scalars(summary.as_dict(), run_dir))
    return summary


def _save_final(prepared: Prepared, model: torch.nn.Module, run_dir: Path, averaged: dict[str, torch.Tensor] | None) -> Path:
    """Save the trained model as ``final/``. With weight averaging, the live weights go to
    ``final-raw/`` first and the average then replaces them in the model, so ``final/``, the
    evaluation after training and compression all use the average."""
    if averaged is not None:
        raw = run_dir / RAW_FINAL
        shutil.rmtree(raw, ignore_errors=True)  # an extended run replaces the shorter run's
        os.replace(prepared.save(run_dir, model), raw)
        load_into(model, averaged)
    return prepared.save(run_dir, model)


def _resume_point(recipe: Recipe, run_dir: Path, world: World) -> tuple[Path | None, dict[str, list[Any]]]:
    """The checkpoint ``--resume`` continues from (None: start again, none was complete) and the
    safe recipe changes; the run directory is rewound to that checkpoint first."""
    if not (run_dir / "recipe.yaml").exists():
        raise UserError("nothing to resume: no run was started here (no recipe.yaml)", where=str(run_dir), hint="train without --resume")
    changes = resume_changes(run_dir, recipe, data_parallel_size(recipe.train.distributed, world.size))
    checkpoints = list_checkpoints(run_dir)
    resume_from = checkpoints[-1] if checkpoints else None
    if (run_dir / "summary.json").exists():  # written after the final model: the run is complete
        if not extends_schedule(recipe, changes, run_dir):
            raise UserError(
                "the run is complete: nothing to resume", where=str(run_dir),
                hint="its model is in final/; to train it further, resume with a larger train.epochs or train.max_steps",
            )
        if resume_from is None:
            raise UserError("the run is complete and kept no checkpoint to extend", where=str(run_dir), hint="train a new run")
    if world.is_main:
        rewind(run_dir, checkpoint_step(resume_from) if resume_from else None)
        if (run_dir / "summary.json").exists():  # extending: the shorter run's summary stays on record
            os.replace(run_dir / "summary.json", run_dir / f"summary-step-{checkpoint_step(resume_from)}.json")
    if resume_from is None and world.is_main:
        print(f"tunelab: {run_dir} has no complete checkpoint yet; starting the run again from step 0", flush=True)
    return resume_from, changes


def _data_line(report: dict[str, Any]) -> str:
    augmented = report.get("augmented")
    added = f" (+{sum(augmented['added'].values())} augmented)" if augmented else ""
    return (
        f"data: {report['format']} | train {report['train_examples']}{added} | validation {report['validation_examples']} | "
        f"supervised tokens {report['supervised_tokens']:,} of {report['tokens']:,} | truncated {report['truncated']} | "
        f"dropped {report['dropped']} | duplicates {report['duplicates_removed']} | bad rows skipped {report['bad_rows_skipped']}"
    )


def _summary(recipe: Recipe, run_dir: Path, device: torch.device, source: str, precision: str, params: Any, data: Any, result: TrainResult, saved: str,
             unit: str, peaks: list[int] | None = None) -> RunSummary:
    steady = max(1e-9, result.seconds - result.first_step_seconds)
    steady_tokens = result.tokens_seen * (1 - 1 / max(1, result.steps)) if result.steps > 1 else result.tokens_seen
    trained = {f.name: getattr(result, f.name) for f in fields(TrainResult)}
    trained.update(seconds=round(result.seconds, 2), first_step_seconds=round(result.first_step_seconds, 2))
    return RunSummary(
        **trained, run_dir=str(run_dir), model=source, precision=precision, trainable_params=params.trainable,
        total_params=params.total, train_examples=len(data.train), validation_examples=len(data.validation),
        tokens_per_s=round(steady_tokens / steady, 1), peak_rss_bytes=peak_rss_bytes(), peak_rss_bytes_per_process=peaks or [peak_rss_bytes()],
        cpu=cpu_model_name(), device=device_name(device), peak_device_bytes=peak_device_bytes(device),
        lr=float(recipe.train.lr), epochs=float(recipe.train.epochs), data=data.report.as_dict(), saved=saved, unit_name=unit,
    )


def format_summary(s: RunSummary) -> str:
    """The one-screen summary printed at the end of ``tunelab train``."""
    lines = [
        "",
        f"run: {s.run_dir}  ({s.stop_reason})",
        f"  trainable params   {s.trainable_params:,} of {s.total_params:,} ({100 * s.trainable_params / max(1, s.total_params):.2f}%)",
        f"  steps / time       {s.steps} steps in {s.seconds:.1f}s (first step {s.first_step_seconds:.1f}s), {s.tokens_per_s:,.0f} tokens/s",
        f"  tokens seen        {s.tokens_seen:,} ({s.supervised_units:,} {s.unit_name})",
        f"  peak memory        {s.peak_rss_bytes / 2**20:,.0f} MiB (process RSS, model load included)"
        + (f"; per process {' / '.join(f'{b / 2**20:,.0f}' for b in s.peak_rss_bytes_per_process)} MiB" if len(s.peak_rss_bytes_per_process) > 1 else ""),
        *([f"  peak GPU memory    {s.peak_device_bytes / 2**20:,.0f} MiB on {s.device} (torch.cuda.max_memory_allocated)"] if s.peak_device_bytes else []),
        f"  optimizer state    {s.optimizer_state_bytes / 2**20:,.1f} MiB ({s.optimizer_state_bytes / max(1, s.trainable_params):.2f} bytes per trainable parameter)",
        f"  final train loss   {s.final_train_loss:.4f}" if s.final_train_loss is not None else "  final train loss   -",
    ]
    if s.eval_after:
        for key, after in s.eval_after.items():
            before = (s.eval_before or {}).get(key)
            change = f"   (before training {before:.4f})" if before is not None else ""
            lines.append(f"  {key:<18} {after:.4f}{change}")
    if s.best_checkpoint:
        lines.append(f"  best checkpoint    {s.best_checkpoint} ({s.best_metric:.4f})")
    lines += [f"  saved              {s.saved}", f"  metrics            {s.run_dir}/metrics.jsonl, {s.run_dir}/loss_curve.png"]
    return "\n".join(lines)


def load_run_recipe(run_dir: Path, overrides: tuple[str, ...] = ()) -> Recipe:
    """The resolved recipe a run directory was trained with (for --resume), plus overrides."""
    path = run_dir / "recipe.yaml"
    if not path.exists():
        raise UserError("not a tunelab run directory (no recipe.yaml)", where=str(run_dir))
    return copy_recipe(load_recipe(path, overrides), output_dir=str(run_dir))


__all__ = ["RunSummary", "format_summary", "load_run_recipe", "run_training"]
