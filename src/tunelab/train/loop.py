"""The training loop: one loop for every technique.

Methods have already prepared the model, the objective says what the loss is, callbacks act on
events. The loop owns only what every technique shares: batching, mixed precision, exact loss
normalisation across gradient accumulation and processes, clipping, the schedule, evaluation,
checkpoints, progress and metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from tqdm import tqdm

from tunelab import atomic
from tunelab.data import Example, batch_tokens, pad_packed_row
from tunelab.errors import UserError
from tunelab.hardware import PrecisionChoice
from tunelab.train import (
    checkpoint,
    frozen_precision,
    pipeline_parallel,
    process_layout,
    shape_buckets,
    sharded_checkpoint,
    sharding,
    tensor_parallel,
)
from tunelab.train.bit_dropout import bit_dropout
from tunelab.train.callbacks import Callback, TrainState
from tunelab.train.chunked_rope import chunked_rotate_half
from tunelab.train.compile import compile_blocks
from tunelab.train.config import TrainConfig
from tunelab.train.distributed import World, unwrap, wrap_model
from tunelab.train.example_scores import example_losses, timed_losses
from tunelab.train.fused_block import fused_blocks
from tunelab.train.fused_mlp import fused_mlps
from tunelab.train.fused_projections import fused_projections
from tunelab.train.grad_compression import bucket_cap_mb, register_compression
from tunelab.train.objectives import Objective, accumulate, fused_cross_entropy
from tunelab.train.optim import build_optimizer, build_scheduler, optimizer_state_bytes
from tunelab.train.samplers import (
    Sampler,
    ShuffleSampler,
    evaluation_batches,
    step_batches,
)
from tunelab.train.weight_average import swapped_in

Collate = Callable[[list[Example]], dict[str, torch.Tensor]]
#: Receives every metrics record as it is written (the job API's event sink).
EventSink = Callable[[dict[str, Any]], None]


class CancelToken(Protocol):
    """Anything with ``is_set()`` (``threading.Event``, ``multiprocessing.Event``)."""

    def is_set(self) -> bool: ...


#: Steps (after the first, which warms up) timed before the run's length is estimated.
ETA_AFTER_STEPS = 3
#: Runs estimated to take longer than this get a warning with their ETA.
LONG_RUN_SECONDS = 24 * 3600


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:,.0f} hours" if hours < 24 * 14 else f"{hours / 24:,.0f} days"


class TooFewExamples(UserError):
    """Not enough examples for one optimizer step (the caller knows the data and says why)."""


class SamplerState(Callback):
    """Carries a sampler's state (its example scores) through checkpoints like a callback's."""

    name = "sampler"

    def __init__(self, sampler: Any):
        self.sampler = sampler

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    steps: int
    seconds: float
    first_step_seconds: float
    tokens_seen: int
    supervised_units: int
    final_train_loss: float | None
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    best_metric: float | None
    best_checkpoint: str | None
    stop_reason: str
    #: Bytes the optimizer keeps for the trainable parameters (moments, statistics), measured.
    optimizer_state_bytes: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _step_accuracy(objective: Objective, stats: dict[str, Any]) -> dict[str, float]:
    """The step's token or example accuracy on this process's micro-batches, when the objective
    reports one (what OpenAI's ``train_mean_token_accuracy`` metric shows)."""
    metrics = objective.summarize(stats)
    return {key: metrics[key] for key in ("token_accuracy", "accuracy") if key in metrics}


@dataclass
class Trainer:
    """Trains ``model`` on ``train`` with ``objective``; writes into ``run_dir`` (rank 0 only)."""

    model: torch.nn.Module
    objective: Objective
    train: list[Example]
    validation: list[Example]
    cfg: TrainConfig
    collate: Collate
    precision: PrecisionChoice
    run_dir: Path
    seed: int = 0
    world: World = field(default_factory=World)
    callbacks: list[Callback] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    show_progress: bool = True
    #: Hold frozen weights in the autocast dtype during ``fit`` (see ``frozen_precision``).
    low_precision_frozen: bool = True
    #: Regional ``torch.compile`` of the transformer blocks (see ``tunelab.train.compile``): faster
    #: steps after a one-time compile measured in minutes on a 2-core CPU, so off unless asked for.
    compile: bool = False
    #: Data order (``tunelab.train.samplers``); default: a seeded shuffle every epoch.
    sampler: Sampler | None = None
    #: Called with every metrics record (rank 0), as it is appended to metrics.jsonl.
    events: EventSink | None = None
    #: Checked after every step; when set, the run checkpoints and stops ("cancelled").
    cancel: CancelToken | None = None
    #: False when some trainable parameters may get no gradient in a step (multi-task heads).
    uses_all_parameters: bool = True
    #: Pad packed rows so their shapes repeat where kernels are built per shape (``shape_buckets``),
    #: for objectives that read a padding segment (``row_padding``).
    bucket_rows: bool = True
    #: Run LoRA-adapted gated MLPs as one function with a hand-written backward (``fused_mlp``).
    fuse_mlp: bool = True
    #: Run LoRA-adapted q/k/v projections as one function per attention module (``fused_projections``).
    fuse_qkv: bool = True
    #: Keep the fused loss's ``[rows, vocab]`` buffers from step to step (``fused_cross_entropy.reused_buffers``).
    reuse_loss_buffers: bool = True
    #: LoRA dropout masks from random bits instead of ``bernoulli_`` (``bit_dropout``): the same dropout, ~3-5x cheaper masks.
    bit_dropout: bool = True
    #: RoPE's ``rotate_half`` by ``chunk`` (``chunked_rope``): the same values, a backward without two whole-size zero tensors.
    chunked_rope: bool = True
    #: Run LoRA-adapted Llama-family decoder blocks as two functions with hand-written backwards (``fused_block``).
    fuse_blocks: bool = True
    #: Inside them, projections that read one input as two matmuls (``stacked_projections``).
    stack_projections: bool = True

    def __post_init__(self) -> None:
        self.layout = process_layout.layout(self.world, self.cfg.distributed, self.device)
        self.data_world = self.layout.data  # who draws which batches; under tensor parallelism not every process
        global_batch = self.cfg.batch_size * self.cfg.grad_accum * self.data_world.size
        if self.sampler is None:
            self.sampler = ShuffleSampler(len(self.train), self.cfg.batch_size, self.seed)
        self.steps_per_epoch = self.sampler.num_batches() // (self.cfg.grad_accum * self.data_world.size)
        if self.steps_per_epoch == 0:
            raise TooFewExamples(
                f"only {len(self.train)} training examples, fewer than one optimizer step's batch ({global_batch})",
                hint="lower train.batch_size / train.grad_accum or add data",
            )
        self.total_steps = self.cfg.max_steps or max(1, math.ceil(self.cfg.epochs * self.steps_per_epoch))
        if hasattr(self.sampler, "bind"):
            self.sampler.bind(self.total_steps, self.cfg.grad_accum * self.data_world.size)
        if hasattr(self.sampler, "state_dict"):
            self.callbacks = [*self.callbacks, SamplerState(self.sampler)]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.name == "fp16")
        self.pipeline: pipeline_parallel.Pipeline | None = None
        self.skeleton = self._split_if_asked()  # before the optimizer: splitting replaces the parameters
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, self.cfg, [cb.lr_multiplier for cb in self.callbacks])
        averaging = [cb.name for cb in self.callbacks if type(cb).averaged_weights is not Callback.averaged_weights]
        if len(averaging) > 1:
            raise UserError(f"two callbacks average weights ({', '.join(averaging)}); the run can save only one average", where="callbacks")
        compression = self.cfg.distributed.grad_compression if self.world.distributed else None
        buckets = bucket_cap_mb(self.model, compression) if compression is not None else None
        self.wrapped = self.model if self.sharded else wrap_model(self.model, self.world, find_unused_parameters=not self.uses_all_parameters, bucket_cap_mb=buckets)
        self.comm = register_compression(self.wrapped, compression) if compression is not None else None
        self.metrics_path = self.run_dir / "metrics.jsonl"
        padding = self.bucket_rows and getattr(self.objective, "row_padding", False)
        self.pads_rows = padding and shape_buckets.pads_rows(self.precision, self.device)
        self._epoch_batches: dict[int, list[list[int]]] = {}

    # -- helpers -------------------------------------------------------------------------------

    @property
    def sharded(self) -> bool:
        """Whether the model's parameters are split over processes (fsdp, tp, fsdp+tp, pp): every
        forward is then collective and each process holds only its part of the weights."""
        return self.skeleton is not None

    def _split_if_asked(self) -> torch.nn.Module | None:
        """Under torchrun with ``train.distributed.strategy`` fsdp, tp, fsdp+tp or pp: splits the
        model in place (tensor parallelism first, then FSDP2 over the data-parallel processes; or
        into pipeline stages) and returns its meta skeleton (``tunelab.train.sharding``); None
        otherwise."""
        settings = self.cfg.distributed
        if self.layout.shard_mesh is None and self.layout.tensor_mesh is None and self.layout.pipeline_mesh is None:
            return None
        unsupported = {
            "train.compile": self.compile,
            "steps that leave some trainable weights without a gradient (task heads, adapter families)": not self.uses_all_parameters,
            "a sampler that scores the examples with the model as it trains": self.layout.pipeline_mesh is not None and hasattr(self.sampler, "scores_due"),
            **{f"the {cb.name} callback (it reads the weights, and would see one shard)": cb.reads_weights for cb in self.callbacks},
        }
        blocked = [what for what, present in unsupported.items() if present]
        if blocked:
            raise UserError(f"strategy {settings.strategy} does not work with {blocked[0]} yet", where="train.distributed.strategy", hint="use strategy: ddp for this run")
        if settings.fsdp.cpu_offload and self.device.type == "cpu":
            raise UserError("fsdp.cpu_offload moves a GPU run's shards to the CPU; this run is on the CPU already", where="train.distributed.fsdp.cpu_offload", hint="remove it")
        skeleton = sharding.meta_skeleton(self.model)
        if self.layout.pipeline_mesh is not None:
            length = pipeline_parallel.fixed_length([len(e.input_ids) for e in (*self.train, *self.validation)])
            self.pipeline = pipeline_parallel.Pipeline(
                self.model, self.objective, self.layout.pipeline_mesh, settings.pp, micro_batches=self.cfg.grad_accum, rows=self.cfg.batch_size, length=length,
                device=self.device, scale_loss=self.scaler.scale,
            )
        if self.layout.tensor_mesh is not None:
            tensor_parallel.parallelize(self.model, self.layout.tensor_mesh)
        if self.layout.shard_mesh is not None:
            sharding.shard(self.model, self.layout.shard_mesh, settings.fsdp, self.precision.dtype if self.precision.autocast else None)
        return skeleton

    def plain_model(self) -> torch.nn.Module | None:
        """The trained model as an ordinary module, for the final save and what runs after it: the
        model itself, or when it is split over processes (fsdp, tp, pp) its skeleton filled with
        the weights gathered to the main process's CPU, and None on the other processes
        (collective: every process calls it)."""
        if self.skeleton is None:
            return self.model
        weights = self.pipeline.gathered_weights() if self.pipeline is not None else sharding.gathered_weights(self.model)
        return sharding.materialize(self.skeleton, weights) if self.world.is_main else None

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Gradients stay in this process for every micro-batch of a step but the last."""
        if sync or not self.world.distributed or (self.sharded and self.layout.shard_mesh is None):  # tp alone syncs no gradients
            return contextlib.nullcontext()
        return sharding.gradients_kept_local(self.wrapped) if self.sharded else self.wrapped.no_sync()

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.precision.dtype, enabled=self.precision.autocast)

    def _attention_scope(self, batch: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
        """The objective's optional attention mode for this batch (see ``objectives.base.Objective``)."""
        scope = getattr(self.objective, "attention_scope", None)
        return scope(self.wrapped, batch) if scope is not None else contextlib.nullcontext()

    def _batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_batches:
            self._epoch_batches = {epoch: self.sampler.batches(epoch)}  # type: ignore[union-attr]
        return self._epoch_batches[epoch]

    def _example(self, index: int) -> Example:
        """Training example ``index``, its weight scaled when the sampler weighs its draws."""
        example = self.train[index]
        weight_of = getattr(self.sampler, "weight_of", None)
        return example if weight_of is None else dataclasses.replace(example, weight=example.weight * weight_of(index))

    def _refresh_scores(self, step: int) -> None:
        """Score every training example with the current model when the sampler asks (curricula
        by loss, self-paced, importance); the draw of this step's batches then uses the scores."""
        due = getattr(self.sampler, "scores_due", None)
        if due is None or not due(step):
            return
        model = unwrap(self.wrapped)
        # sharded, every forward is collective: each process scores every example (in the same batches)
        world = World() if self.sharded else self.world
        record = timed_losses(step, lambda: example_losses(model, self.objective, self.collate, self.train, autocast=self._autocast, world=world, device=self.device))
        self.sampler.set_scores(step, record.scores)  # type: ignore[union-attr]
        self._epoch_batches = {}
        if self.world.is_main:
            atomic.append_jsonl(self.run_dir / "example_scores.jsonl", {"step": step, "seconds": record.seconds, "scores": record.scores})
        self._log({"type": "scores", "step": step, **record.summary()})

    def _log_static_scores(self) -> None:
        """A sampler ranked before training (by length, a column, a teacher) logs its scores once."""
        scores = getattr(self.sampler, "scores", None)
        if scores is not None and self.world.is_main:
            atomic.append_jsonl(self.run_dir / "example_scores.jsonl", {"step": 0, "seconds": 0.0, "scores": scores})

    def _batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """``examples`` collated, a packed row padded to its shape multiple (``shape_buckets``), on the device."""
        batch = self.collate(examples)
        if self.pads_rows and "position_ids" in batch and "attention_mask" not in batch:
            batch = pad_packed_row(batch, shape_buckets.row_multiple(batch["input_ids"].shape[1]))
        return self._to_device(batch)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _log(self, record: dict[str, Any]) -> None:
        if self.world.is_main:
            atomic.append_jsonl(self.metrics_path, record)
            if self.events is not None:
                self.events(record)

    def _each(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(*args)

    def _describe_sampler(self, step: int) -> dict[str, float]:
        describe = getattr(self.sampler, "describe", None)
        return describe(step) if describe is not None else {}

    def averaged_weights(self) -> dict[str, torch.Tensor] | None:
        """The weights a callback averages (SWA, EMA), once it has any; None otherwise."""
        for cb in self.callbacks:
            weights = cb.averaged_weights()
            if weights is not None:
                return weights
        return None

    def evaluate(self) -> dict[str, float]:
        """Objective metrics on the validation set, prefixed ``eval_``: of the averaged weights when
        a callback averages, with the live weights' metrics beside them as ``eval_raw_*``."""
        averaged = self.averaged_weights()
        if averaged is None:
            return self._evaluate("eval_")
        raw = self._evaluate("eval_raw_")
        with swapped_in(unwrap(self.wrapped), averaged):
            return {**self._evaluate("eval_"), **raw}

    @torch.no_grad()
    def _evaluate(self, prefix: str) -> dict[str, float]:
        model = unwrap(self.wrapped)
        was_training = model.training
        model.eval()
        stats: dict[str, Any] = {}
        by_language: dict[str, dict[str, Any]] = {}
        groups = list(evaluation_batches(self.validation, self.cfg.batch_size))
        batches = (self._batch([self.validation[i] for i in indices]) for indices in groups)  # one at a time
        with self._autocast():
            # a pipeline runs its micro-batches together; one process scores each batch as it is collated
            per_batch = self.pipeline.evaluate(list(batches)) if self.pipeline is not None else (self.objective(model, b)[1] for b in batches)
            for indices, batch_stats in zip(groups, per_batch):
                accumulate(stats, batch_stats)
                language = self.validation[indices[0]].language
                if language is not None:
                    accumulate(by_language.setdefault(language, {}), batch_stats)
        model.train(was_training)
        metrics = {f"{prefix}{k}": v for k, v in self.objective.summarize(stats).items()}
        if len(by_language) > 1:  # data.language_column: each language's metrics (not per class) beside the overall ones
            for language, language_stats in by_language.items():
                summary = self.objective.summarize(language_stats)
                metrics.update({f"{prefix}{language}_{k}": v for k, v in summary.items() if not k.startswith("recall_")})
        return metrics

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, resume_from: Path | None = None) -> TrainResult:
        # probed on the weights as loaded, before the frozen ones change dtype; compiled blocks and
        # shards (DTensors) keep the modules' own MLP and projections
        fusable = not self.compile and not self.sharded
        with contextlib.ExitStack() as fused:
            if self.reuse_loss_buffers:
                fused.enter_context(fused_cross_entropy.reused_buffers())
            if self.bit_dropout:
                fused.enter_context(bit_dropout(self.model))
            if self.chunked_rope:
                fused.enter_context(chunked_rotate_half(self.model))
            if self.fuse_mlp and fusable:
                fused.enter_context(fused_mlps(self.model))
            if self.fuse_qkv and fusable:
                fused.enter_context(fused_projections(self.model))
            if self.fuse_blocks and fusable:
                fused.enter_context(fused_blocks(self.model, stack=self.stack_projections))
            cast = self.low_precision_frozen and self.precision.autocast and not self.sharded  # FSDP keeps the shards' dtype
            original = frozen_precision.cast_frozen(self.model, self.precision.dtype) if cast else frozen_precision.FrozenCast()
            if self.compile:
                compile_blocks(self.model)
            try:
                return self._fit(resume_from)
            finally:
                # the fused functions undone first: the stacked projections give the frozen weights
                # their own storage back before restore widens them (else both copies coexist)
                fused.close()
                frozen_precision.restore(original)

    def _fit(self, resume_from: Path | None) -> TrainResult:
        state = TrainState(self.model, self.optimizer, self.run_dir, self.total_steps)
        eval_before = None
        if resume_from is None and self.validation and self.cfg.eval_before:
            eval_before = self._eval_and_log(state, log_only=True)
        # Callbacks start before a checkpoint loads: one that re-wraps layers (QAT) must do so
        # before the checkpoint's parameter names can match, and its saved state then overrides
        # whatever its start computed.
        self._each("on_train_start", state)
        info: dict[str, Any] = {}
        if resume_from is not None:
            if self.pipeline is not None and not sharded_checkpoint.is_sharded(resume_from):
                raise UserError(f"strategy pp resumes from sharded checkpoints (written by pp, or fsdp with checkpoint: sharded); {resume_from.name} was written whole",
                                where=str(resume_from), hint="resume it with the strategy that wrote it, then continue under pp from the next checkpoint")
            info = checkpoint.load_checkpoint(resume_from, self.model, self.optimizer, self.scheduler, self.callbacks)
            if self.comm is not None:
                self.comm.load_state_dict(checkpoint.process_state(resume_from, self.world.rank))
            eval_before = info.get("eval_before")
        start_step = state.step = info.get("step", 0)
        if resume_from is None:
            self._log_static_scores()
        best_value: float | None = info.get("best_value")
        best_path: str | None = info.get("best_checkpoint")

        self.wrapped.train()
        progress = tqdm(
            total=self.total_steps, initial=start_step, desc="train", unit="step",
            disable=not (self.show_progress and self.world.is_main), mininterval=1.0, dynamic_ncols=True,
        )
        # A resumed run carries its totals on: the summary describes the whole run, not the last leg.
        started = time.perf_counter() - info.get("seconds", 0.0)
        first_step_seconds = after_first_step = 0.0
        tokens_seen, supervised = info.get("tokens_seen", 0), info.get("supervised_units", 0)
        last_loss: float | None = info.get("train_loss")
        last_eval: dict[str, float] | None = info.get("last_eval")
        window_tokens, window_start = 0, time.perf_counter()
        stop_reason = "completed"

        def carried() -> dict[str, Any]:
            """What a checkpoint keeps besides weights: the best so far and the run's totals."""
            return {
                "best_value": best_value, "best_checkpoint": best_path, "eval_before": eval_before, "last_eval": last_eval,
                "train_loss": last_loss, "tokens_seen": tokens_seen, "supervised_units": supervised,
                "seconds": time.perf_counter() - started, "processes": self.world.size,
                "data_parallel": self.data_world.size,  # a resume checks the global batch against it
            }

        updating = False  # True while weights, optimizer and scheduler are mid-update
        try:
            for step in range(start_step, self.total_steps):
                step_start = time.perf_counter()
                rng_before_step = checkpoint.rng_state()  # an interrupted step has drawn dropout masks
                epoch, in_epoch = divmod(step, self.steps_per_epoch)
                state.epoch = epoch
                if in_epoch == 0:
                    self._each("on_epoch_start", state)
                self._refresh_scores(step)
                micro = [
                    self._batch([self._example(i) for i in idx])
                    for idx in step_batches(self._batches(epoch), in_epoch, self.cfg.grad_accum, self.data_world.rank, self.data_world.size)
                ]
                self._each("on_step_start", state, micro)
                units = self.data_world.all_sum(sum(self.objective.units(b) for b in micro))
                if units == 0:
                    raise UserError(f"step {step}: no supervised tokens in the batch", hint="check data masking (train_on_prompt)")
                if self.pipeline is not None:
                    with self._autocast():
                        loss_total, step_stats = self.pipeline.train_step(micro, units)
                else:
                    loss_total, step_stats = self._forward_backward(micro, units)
                self._each("on_after_backward", state)
                if self.cfg.max_grad_norm:
                    self.scaler.unscale_(self.optimizer)
                    clip = self.pipeline.clip_grad_norm_ if self.pipeline is not None else sharding.clip_grad_norm_
                    clip([p for p in self.model.parameters() if p.requires_grad], self.cfg.max_grad_norm)
                updating = True
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)

                comm = self._comm_bytes()
                step_tokens = int(self.data_world.all_sum(sum(batch_tokens(b) for b in micro)))
                tokens_seen += step_tokens
                supervised += int(units)
                window_tokens += step_tokens
                last_loss = self.data_world.all_sum(loss_total) / units
                state.step, state.loss, state.lr = step + 1, last_loss, self.scheduler.get_last_lr()[0]
                updating = False
                if step == start_step:
                    first_step_seconds = time.perf_counter() - step_start
                    after_first_step = time.perf_counter()
                elif step == start_step + ETA_AFTER_STEPS and self.world.is_main:
                    self._warn_if_long((time.perf_counter() - after_first_step) / ETA_AFTER_STEPS, self.total_steps - state.step)
                self._each("on_step_end", state)

                if state.step % self.cfg.log_every == 0 or state.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    tps = window_tokens / elapsed if elapsed > 0 else 0.0
                    record = {
                        "type": "train", "step": state.step, "total_steps": self.total_steps, "epoch": round(step / self.steps_per_epoch, 4),
                        "loss": last_loss, **_step_accuracy(self.objective, step_stats),
                        "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tps, "tokens_seen": tokens_seen, "threads": torch.get_num_threads(),
                        "elapsed_s": time.perf_counter() - started, **self._describe_sampler(step), **comm,
                    }
                    self._log(record)
                    state.history.append(record)
                    progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
                    window_tokens, window_start = 0, time.perf_counter()
                progress.update(1)

                final = state.step == self.total_steps
                is_best = evaluated = False
                if self.validation and ((self.cfg.eval_every and state.step % self.cfg.eval_every == 0) or final):
                    last_eval, evaluated = self._eval_and_log(state), True
                    value = last_eval.get(self.cfg.best_metric)
                    if value is not None and (best_value is None or (value < best_value if self.cfg.best_mode == "min" else value > best_value)):
                        best_value, best_path, is_best = value, str(self._checkpoint_path(state.step)), True
                if (step + 1) % self.steps_per_epoch == 0:
                    self._each("on_epoch_end", state)
                if self.cancel is not None and self.cancel.is_set() and not state.should_stop:
                    state.should_stop, state.stop_reason = True, "cancelled"
                state.should_stop = self.world.broadcast_flag(state.should_stop)
                due = state.step % self.cfg.save_every == 0 if self.cfg.save_every else evaluated
                if is_best or final or state.should_stop or due:
                    self._checkpoint(state, carried(), best_path)
                if state.should_stop:
                    stop_reason = state.stop_reason or "stopped by a callback"
                    break
        except KeyboardInterrupt:
            # Ctrl-C: keep the last completed step, so `--resume` continues exactly from it.
            stop_reason = "interrupted"
            if not updating and state.step > start_step:
                self._checkpoint(state, carried(), best_path, rng=rng_before_step if state.step == step else None)
        progress.close()
        self._each("on_train_end", state)
        return TrainResult(
            steps=state.step, seconds=time.perf_counter() - started, first_step_seconds=first_step_seconds,
            tokens_seen=tokens_seen, supervised_units=supervised, final_train_loss=last_loss,
            eval_before=eval_before, eval_after=last_eval, best_metric=best_value, best_checkpoint=best_path,
            stop_reason=stop_reason, optimizer_state_bytes=optimizer_state_bytes(self.optimizer), history=state.history,
        )

    def _forward_backward(self, micro: list[dict[str, torch.Tensor]], units: float) -> tuple[float, dict[str, Any]]:
        """Forward and backward of a step's micro-batches in this process; returns the summed loss
        and the objective's statistics."""
        loss_total, step_stats = 0.0, {}
        for j, batch in enumerate(micro):
            with self._attention_scope(batch):  # forward and backward (checkpointing re-runs the forward)
                with self._gradient_sync(j == len(micro) - 1), self._autocast():
                    loss_sum, batch_stats = self.objective(self.wrapped, batch)
                    # Summed loss / units of the whole step; DDP and FSDP average gradients over
                    # data-parallel processes, so scaling by their number makes the result the global
                    # token mean exactly (tensor-parallel processes share a batch: nothing to average).
                    loss = loss_sum * (self.data_world.size / units)
                self.scaler.scale(loss).backward()
            loss_total += float(loss_sum.detach())
            accumulate(step_stats, batch_stats)
        return loss_total, step_stats

    def _warn_if_long(self, seconds_per_step: float, steps_left: int) -> None:
        """Say so when the schedule asks for more than a day (a typo like ``epochs: 1e9`` should
        not start a four-year run without a word); the progress bar keeps the ETA after that."""
        eta = seconds_per_step * steps_left
        if eta > LONG_RUN_SECONDS:
            tqdm.write(
                f"warning: {steps_left:,} more steps at {seconds_per_step:.2f} s/step will take about {_duration(eta)} "
                f"(train.epochs={self.cfg.epochs:g}, train.max_steps={self.cfg.max_steps}); Ctrl-C stops with a checkpoint",
                file=sys.stderr,
            )

    def _eval_and_log(self, state: TrainState, log_only: bool = False) -> dict[str, float]:
        metrics = self.evaluate() if self.world.is_main or self.sharded else {}  # sharded forwards need every process
        self.world.barrier()
        if self.world.is_main:
            record = {"type": "eval", "step": state.step, **metrics}
            self._log(record)
            state.history.append(record)
            if not log_only:
                self._each("on_eval", state, metrics)
        return metrics

    def _comm_bytes(self) -> dict[str, int]:
        """This process's bytes sent for gradients in the step just taken, and what the plain fp32
        all-reduce would have sent (logged when gradients are compressed)."""
        if self.comm is None:
            return {}
        sent, dense = self.comm.take_counts()
        return {"comm_bytes": sent, "comm_dense_bytes": dense}

    def _checkpoint_path(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / f"step-{step:07d}"

    def _checkpoint(self, state: TrainState, info: dict[str, Any], best_path: str | None, rng: dict[str, Any] | None = None) -> None:
        """Write a checkpoint (rank 0), then keep only the last ``keep_last`` and the best."""
        per_process = self.world.all_gather_object(self.comm.state_dict()) if self.comm is not None else None
        started = None
        if self.sharded and (self.cfg.distributed.fsdp.checkpoint == "sharded" or self.pipeline is not None):  # each process writes its part, nothing gathered
            target = self._checkpoint_path(state.step)
            started = Path(self.world.broadcast_object(str(atomic.temporary_sibling(target)) if self.world.is_main else None))
            sharded_checkpoint.save(started, self.model, self.optimizer)
            self.world.barrier()
        # otherwise gathered (collective when sharded): the same checkpoint whatever the world size
        gathers = started is None and (self.world.is_main or self.sharded)
        weights = checkpoint.trainable_state(unwrap(self.wrapped)) if gathers else {}
        optimizer_state = {"optimizer": sharding.full(self.optimizer.state_dict())} if gathers else {}
        if self.world.is_main:
            checkpoint.save_checkpoint(self.run_dir, state.step, weights, {**optimizer_state, "scheduler": self.scheduler.state_dict()}, info,
                                       self.callbacks, rng, per_process, started)
            checkpoint.prune_checkpoints(self.run_dir, self.cfg.keep_last, Path(best_path) if best_path else None)
        self.world.barrier()
