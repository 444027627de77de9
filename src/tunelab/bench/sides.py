"""The two trainers under test, each one function: workload in, measurements out.

Both functions run inside their own worker process (``tunelab.bench.worker``), or in the
caller's when a ``Probe`` looks inside (``bench/bf16_grad_fidelity.py``). They report the
same things measured the same way: per-step wall-clock ends, per-step training loss, held-out
loss computed by one shared function, and the data's real/supervised token counts per step.
The final training loss is the mean over the last quarter of the steps (one step's loss is one
batch's, so a single step would compare batches, not models).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

import torch

from tunelab.bench.measure import (
    ModelShape,
    model_shape,
    peak_device_mb,
    peak_rss_mb,
    real_tokens,
    step_flops,
    supervised_tokens,
    synchronize,
)
from tunelab.bench.workload import Workload, WorkloadData, build_workload_data
from tunelab.data import Example, collate_packed
from tunelab.hardware import PrecisionChoice, configure_threads, resolve_precision, threads_are_automatic
from tunelab.train.objectives import accumulate
from tunelab.train.objectives.causal_lm import CausalLMObjective


class Probe(Protocol):
    """Looks inside a side's training without changing it (``bench/bf16_grad_fidelity.py``)."""

    def prepare(self, model: torch.nn.Module) -> None:
        """Called once the adapters exist, before training starts."""

    def after_backward(self, model: torch.nn.Module) -> None:
        """Called after each step's backward, before clipping and the optimizer."""


def heldout_loss(model: torch.nn.Module, examples: list[Example], precision: PrecisionChoice, batch_size: int, device: str) -> float:
    """Token-mean cross-entropy on supervised tokens: one definition for both sides."""
    objective = CausalLMObjective(model)
    model.eval()
    stats: dict[str, Any] = {}
    with torch.no_grad(), torch.autocast(device, dtype=precision.dtype, enabled=precision.autocast):
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate_packed(examples[i : i + batch_size]).items()}
            accumulate(stats, objective(model, batch)[1])
    return objective.summarize(stats)["loss"]


class StepClock:
    """Wall-clock ends of optimizer steps since training started; advances a profiler schedule."""

    def __init__(self, profiler: torch.profiler.profile | None, device: str = "cpu") -> None:
        self.profiler = profiler
        self.device = device
        self.origin = time.perf_counter()
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []  # process CPU time: less sensitive to other jobs than wall time

    def start(self) -> None:
        self.origin = time.perf_counter()

    def tick(self) -> None:
        synchronize(self.device)  # a GPU step ends when its kernels do
        self.ends.append(time.perf_counter() - self.origin)
        self.cpu_ends.append(time.process_time())
        if self.profiler is not None:
            self.profiler.step()


def training_peaks(device: str) -> dict[str, float | None]:
    """Memory high-water marks as training ends (model load included), taken before the held-out
    loss both sides share: that is the harness checking loss parity, not part of either trainer's
    run (the worker records the peak with it too)."""
    return {"peak_rss_mb": peak_rss_mb(), "peak_device_mb": peak_device_mb(device)}


def _report(workload: Workload, data: WorkloadData, shape: ModelShape, clock: StepClock, losses: list[float],
            eval_loss: float, precision: PrecisionChoice, setup_seconds: float, peaks: dict[str, float | None],
            shared_prefix: bool = False) -> dict[str, Any]:
    """Throughput over steps 2..N (step 1 carries one-time warm-up, reported on its own)."""
    steps = [data.step_examples(s, workload.batch_size) for s in range(workload.steps)]
    steady = steps[1:]
    step_ends = clock.ends
    seconds = step_ends[-1] - step_ends[0]
    tail = max(1, len(losses) // 4)
    return {
        "precision": precision.name,
        "threads": torch.get_num_threads(),
        "setup_seconds": setup_seconds,
        "first_step_seconds": step_ends[0],
        "steady_seconds": seconds,
        "steady_cpu_seconds": clock.cpu_ends[-1] - clock.cpu_ends[0],
        "step_seconds": [b - a for a, b in zip([0.0, *step_ends], step_ends)],
        "real_tokens": sum(real_tokens(s) for s in steady),
        "supervised_tokens": sum(supervised_tokens(s) for s in steady),
        "flops": sum(step_flops(s, shape, shared_prefix) for s in steady),
        "step_losses": losses,
        "final_train_loss": sum(losses[-tail:]) / tail,
        "eval_loss": eval_loss,
        "model_shape": shape.as_dict(),
        **peaks,
    }


def _setup(workload: Workload, workdir: Path) -> tuple[PrecisionChoice, Any, WorkloadData]:
    """Threads, precision, seed, model and data: identical for both sides."""
    from tunelab.models import load_model

    configure_threads(workload.threads)
    precision = resolve_precision(workload.precision, torch.device(workload.device))
    torch.manual_seed(workload.seed)
    loaded = load_model(workload.model, seed=workload.seed)
    return precision, loaded, build_workload_data(workload, loaded.tokenizer, workdir)


def run_tunelab(workload: Workload, workdir: Path, profiler: torch.profiler.profile | None = None, probe: Probe | None = None) -> dict[str, Any]:
    """tunelab's engine with the levers ``workload`` leaves on."""
    from tunelab.data import collate_padded
    from tunelab.methods import apply_methods
    from tunelab.methods.config import LoraConfig, MethodConfig
    from tunelab.train.callbacks import Callback
    from tunelab.train.config import TrainConfig
    from tunelab.train.free_cores import FreeCoreThreads
    from tunelab.train.loop import Trainer

    start = time.perf_counter()
    precision, loaded, data = _setup(workload, workdir)
    lora = LoraConfig(r=workload.lora_r, alpha=workload.lora_alpha, dropout=workload.lora_dropout, target_modules="all-linear")
    model = apply_methods(loaded.model, MethodConfig(lora=lora), model_task="causal-lm", tokenizer_dir=loaded.details.get("directory"))
    model.to(workload.device)
    if probe is not None:
        probe.prepare(model)
    if workload.uses("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as train.gradient_checkpointing
    cfg = TrainConfig(
        max_steps=workload.steps, batch_size=workload.batch_size, lr=workload.lr, schedule="cosine",
        max_grad_norm=workload.max_grad_norm, eval_before=False, save_every=workload.steps,
    )
    objective = CausalLMObjective(model, sliced_logits=workload.uses("sliced_logits"), varlen=workload.uses("varlen"),
                                  fused_loss=workload.uses("fused_loss"), shared_prefix=workload.uses("shared_prefix"),
                                  sliced_last_mlp=workload.uses("sliced_last_mlp"))
    pad_id = loaded.tokenizer.pad_token_id or 0
    shared = objective.shared_prefix and workload.uses("packing")
    unread = objective.drops_unread_inputs and workload.uses("unread_inputs")
    collate = (lambda examples: collate_packed(examples, shared, drop_unread_inputs=unread)) if workload.uses("packing") else (lambda examples: collate_padded(examples, pad_id))
    clock = StepClock(profiler, workload.device)

    class Clock(Callback):
        def on_train_start(self, state) -> None:
            clock.start()

        def on_step_end(self, state) -> None:
            clock.tick()

        def on_after_backward(self, state) -> None:
            if probe is not None:
                probe.after_backward(model)

    free_cores = [FreeCoreThreads()] if threads_are_automatic(workload.threads) else []  # as `tunelab train` has
    trainer = Trainer(
        model=model, objective=objective, train=data.train, validation=[], cfg=cfg, collate=collate, precision=precision,
        run_dir=workdir / "tunelab-run", seed=workload.seed,
        callbacks=[Clock(), *free_cores],
        show_progress=False, device=torch.device(workload.device),
        low_precision_frozen=workload.uses("low_precision_frozen"), compile=workload.uses("compile"), bucket_rows=workload.uses("bucketing"),
        fuse_mlp=workload.uses("fused_mlp"), fuse_qkv=workload.uses("fused_qkv"), reuse_loss_buffers=workload.uses("loss_buffers"),
        chunked_rope=workload.uses("chunked_rope"), fuse_blocks=workload.uses("fused_blocks"), stack_projections=workload.uses("stacked_projections"),
        bit_dropout=workload.uses("bit_dropout"),
    )
    setup = time.perf_counter() - start
    result = trainer.fit()
    peaks = training_peaks(workload.device)
    losses = [r["loss"] for r in result.history if r.get("type") == "train"]
    eval_loss = heldout_loss(model, data.validation, precision, workload.batch_size, workload.device)
    report = _report(workload, data, model_shape(model), clock, losses, eval_loss, precision, setup, peaks, shared)
    return {**report, "thread_changes": [list(change) for cb in free_cores for change in cb.changes]}  # (step, from, to)


def run_hf(workload: Workload, workdir: Path, profiler: torch.profiler.profile | None = None, probe: Probe | None = None) -> dict[str, Any]:
    """The documented standard path: Trainer + peft LoRA + DataCollatorForSeq2Seq (padding, -100 labels)."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    start = time.perf_counter()
    precision, loaded, data = _setup(workload, workdir)
    lora = LoraConfig(r=workload.lora_r, lora_alpha=workload.lora_alpha, lora_dropout=workload.lora_dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(loaded.model, lora)
    if probe is not None:
        probe.prepare(model)
    rows = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
        for e in data.ordered[: workload.steps * workload.batch_size]
    ]
    args = TrainingArguments(
        output_dir=str(workdir / "hf-run"), per_device_train_batch_size=workload.batch_size, max_steps=workload.steps,
        learning_rate=workload.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=workload.max_grad_norm, bf16=precision.name == "bf16", fp16=precision.name == "fp16",
        use_cpu=workload.device == "cpu", logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", train_sampling_strategy="sequential",
        seed=workload.seed, dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
    )
    clock = StepClock(profiler, workload.device)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):  # after clipping: a probing workload sets max_grad_norm out of reach
            if probe is not None:
                probe.after_backward(model)

    collator = DataCollatorForSeq2Seq(loaded.tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Clock()])
    setup = time.perf_counter() - start
    trainer.train()
    peaks = training_peaks(workload.device)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    eval_loss = heldout_loss(model, data.validation, precision, workload.batch_size, workload.device)
    return _report(workload, data, model_shape(model), clock, losses, eval_loss, precision, setup, peaks)


SIDES = {"tunelab": run_tunelab, "hf": run_hf}
