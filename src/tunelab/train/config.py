"""The ``train:`` section: the optimisation loop's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunelab.config_base import PositiveOrAuto, Section


class EarlyStoppingConfig(Section):
    """Stop when an evaluated metric stops improving."""

    metric: str = Field("eval_loss", description="Any metric logged at evaluation time, e.g. eval_loss, eval_accuracy.")
    mode: Literal["min", "max"] = "min"
    patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as an improvement.")


class GradCompressionConfig(Section):
    """What data-parallel processes send each other for the gradients."""

    method: Literal["none", "fp16", "bf16", "powersgd", "topk", "sign"] = Field(
        "none", description="none (fp32 all-reduce, counted), fp16/bf16 (cast), powersgd (low rank), topk (largest entries, error feedback), sign (1 bit, majority vote)."
    )
    rank: int = Field(1, gt=0, description="powersgd: rank of the gradient factors.")
    start_step: int = Field(10, ge=2, description="powersgd: plain all-reduce steps before compressing (error feedback needs at least 2).")
    ratio: float = Field(0.01, gt=0, le=1, description="topk: fraction of each bucket's entries sent.")


class FsdpConfig(Section):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) on every transformer block and the whole model."""

    reshard_after_forward: bool = Field(
        True, description="Free each block's gathered weights after its forward and gather them again for the backward "
        "(least memory); false keeps them until the backward (one all-gather fewer per block, more memory).",
    )
    cpu_offload: bool = Field(False, description="Keep the sharded parameters, gradients and optimizer step on the CPU (GPU runs that do not fit).")
    mixed_precision: bool = Field(
        False, description="Gather parameters in train.precision's dtype (bf16/fp16) and reduce gradients in fp32 "
        "(MixedPrecisionPolicy): half the traffic; off: fp32 shards under autocast, like one process.",
    )
    checkpoint: Literal["full", "sharded"] = Field(
        "full", description="full: checkpoints gathered to full size by rank 0 (one safetensors file, readable anywhere); "
        "sharded: each process writes its shards (torch.distributed.checkpoint), nothing gathered: for models too large for one host. "
        "Either resumes on any number of processes.",
    )


class TensorParallelConfig(Section):
    """Megatron-style tensor parallelism through DTensor's ``parallelize_module``."""

    degree: int | None = Field(
        None, gt=1, description="Processes that split each layer's matrices (q/k/v/gate/up by columns, o/down by rows, the "
        "embedding and LM head by vocabulary). strategy tp: all processes (the default); fsdp+tp: required, and the "
        "processes divide into (processes / degree) data-parallel groups. Must divide the attention and key/value heads.",
    )


class PipelineConfig(Section):
    """Pipeline parallelism through ``torch.distributed.pipelining``: each process holds a range of
    the transformer blocks (a stage); a step's micro-batches (``train.grad_accum`` of them) flow
    through the stages so that they work at the same time."""

    schedule: Literal["1f1b", "gpipe"] = Field(
        "1f1b", description="1f1b: each stage alternates one forward and one backward once the pipeline is full (keeps at most "
        "stages micro-batches' activations; needs train.grad_accum >= processes); gpipe: all forwards, then all backwards "
        "(keeps every micro-batch's activations).",
    )
    layers: list[int] | None = Field(
        None, description="Transformer blocks per stage, first stage first (e.g. [14, 16] for 30 blocks over 2 processes); "
        "default: as even as possible, earlier stages taking the remainder (the last also runs the LM head and loss).",
    )

    @field_validator("layers")
    @classmethod
    def _every_stage_has_blocks(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and any(n < 1 for n in layers):
            raise ValueError("every stage needs at least one block: give positive counts")
        return layers


class DistributedConfig(Section):
    """How the processes of a torchrun job share the work (ignored in one process)."""

    strategy: Literal["ddp", "fsdp", "tp", "fsdp+tp", "pp"] = Field(
        "ddp", description="ddp: every process holds the whole model, gradients are averaged (DistributedDataParallel); "
        "fsdp: parameters, gradients and optimizer state are sharded over the processes (FSDP2), for models that do not fit one device; "
        "tp: every layer's matrices are split over the processes, which all see the same batch (tensor parallelism: fast interconnect, "
        "layers too large for one device); fsdp+tp: tensor parallel groups of tp.degree processes, sharded data parallelism across them; pp: each process holds a range of the blocks and micro-batches flow through "
        "them (pipeline parallelism: slow interconnect, deep models).",
    )
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig, description="FSDP2 settings (strategy: fsdp or fsdp+tp).")
    tp: TensorParallelConfig = Field(default_factory=TensorParallelConfig, description="Tensor parallel settings (strategy: tp or fsdp+tp).")
    pp: PipelineConfig = Field(default_factory=PipelineConfig, description="Pipeline parallel settings (strategy: pp).")
    timeout_s: float | None = Field(
        None, gt=0, description="How long a collective waits for a process that stopped answering before the job ends with an error "
        "(a process that died is noticed at once); default: PyTorch's (30 min on gloo, 10 on NCCL). Keep it above rank 0's longest evaluation.",
    )
    grad_compression: GradCompressionConfig | None = Field(None, description="Compress the gradients processes exchange (DDP communication hooks).")

    @model_validator(mode="after")
    def _settings_belong_to_the_strategy(self) -> DistributedConfig:
        if self.strategy != "ddp" and self.grad_compression is not None:
            raise ValueError("grad_compression works through DDP's communication hooks: use strategy: ddp, or remove grad_compression")
        if "fsdp" not in self.strategy and self.fsdp != FsdpConfig():
            raise ValueError(f"fsdp settings apply to strategy fsdp or fsdp+tp, not {self.strategy}: remove train.distributed.fsdp or change the strategy")
        if "tp" not in self.strategy and self.tp != TensorParallelConfig():
            raise ValueError(f"tp settings apply to strategy tp or fsdp+tp, not {self.strategy}: remove train.distributed.tp or change the strategy")
        if self.strategy != "pp" and self.pp != PipelineConfig():
            raise ValueError(f"pp settings apply to strategy pp, not {self.strategy}: remove train.distributed.pp or change the strategy")
        if self.strategy == "fsdp+tp" and self.tp.degree is None:
            raise ValueError("strategy fsdp+tp needs train.distributed.tp.degree (processes per tensor parallel group, e.g. 2 or the GPUs of one node)")
        return self


class TrainConfig(Section):
    """Optimizer, schedule, batch shape, precision and bookkeeping of one training run."""

    epochs: PositiveOrAuto = Field(
        "auto", description="Passes over the training split; auto: 1 from 300 examples up, more for smaller splits (tunelab.train.auto_settings).",
    )
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(4, gt=0, description="Examples per micro-batch per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")

    optimizer: str = Field(
        "adamw", description="adamw | adam | sgd | lion | signum | signsgd | adafactor | adamw8bit, or any optimizer registered with "
        "tunelab.train.optim.register_optimizer. Sign-based ones (lion, signum, signsgd) want a 3-10x smaller lr.",
    )
    lr: PositiveOrAuto = Field(
        "auto", description="Peak learning rate; auto: by what trains (LoRA 5e-4, full fine-tuning 2e-5, ...; tunelab.train.auto_settings).",
    )
    weight_decay: float = Field(0.0, ge=0)
    decay_norms_biases_embeddings: bool = Field(False, description="Apply weight decay to norms, biases and embeddings too.")
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, description="SGD momentum.")
    nesterov: bool = False
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warmup as a fraction of total steps (if warmup_steps is 0).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of linear/cosine decay as a fraction of lr.")
    layer_lr_decay: float = Field(1.0, gt=0, le=1, description="Layer-wise LR decay: layer i of L gets lr * decay^(L-1-i).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null disables.")
    sparse_updates: bool = Field(
        False, description="Sparse embedding gradients: a step updates only the input-embedding rows its tokens used (lazy Adam for "
        "those rows, torch's SparseAdam); for a trainable, untied embedding, in one process or under ddp on gloo (tunelab.train.sparse_updates).",
    )

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tf32: bool | None = Field(
        None, description="fp32 matmuls on TF32 tensor cores (Ampere+ GPUs); default: on where supported. false: IEEE fp32. CPUs ignore it."
    )
    threads: int | None = Field(None, gt=0, description="CPU threads; default: the cores other processes leave free, followed step by step.")
    gradient_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each transformer block: faster steps after a one-time compile of minutes on CPU.")
    fuse_mlp: bool = Field(True, description="Run LoRA-adapted gated MLPs as one function with a hand-written backward (less memory, faster); false: peft's own layers.")
    fuse_qkv: bool = Field(True, description="Run LoRA-adapted q/k/v projections as one function per attention block (one down-projection matmul for the three; faster); false: peft's own layers.")
    fuse_blocks: bool = Field(True, description="Run each LoRA-adapted Llama-family decoder block on packed rows as two functions with hand-written backwards (norms, projections, RoPE, attention, residuals; faster); false: the block's own forward.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="How torchrun's processes share the work: ddp, fsdp, tp or fsdp+tp, gradient compression.")

    eval_every: int | None = Field(None, gt=0, description="Evaluate every N steps (and always at the end).")
    eval_before: bool = Field(True, description="Evaluate the untrained model first, so improvement is measured.")
    log_every: int = Field(1, gt=0)
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N steps (and at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept besides the best one.")
    early_stopping: EarlyStoppingConfig | None = None
    best_metric: str = Field("eval_loss", description="Metric that picks the best checkpoint.")
    best_mode: Literal["min", "max"] = "min"
    report_to: list[Literal["tensorboard", "mlflow", "trackio"]] = Field(
        default_factory=list, description="Mirror metrics.jsonl, the recipe and the final figures to these trackers (local; "
        "pip install 'tunelab[trackers]'); see tunelab.report.trackers for where each writes.",
    )

    @field_validator("optimizer")
    @classmethod
    def _registered_optimizer(cls, value: str) -> str:
        from tunelab.train.optimizers import (
            OPTIMIZERS,  # registering imports torch: not at config import
        )

        if value not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {value!r}; registered: {', '.join(OPTIMIZERS.names())}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.early_stopping is not None and self.eval_every is None:
            raise ValueError("early_stopping needs train.eval_every (how often to evaluate)")
        if self.sparse_updates and self.distributed.strategy != "ddp":
            raise ValueError(f"sparse_updates needs the whole embedding in every process (ddp): it does not combine with strategy {self.distributed.strategy}")
        if self.sparse_updates and self.distributed.grad_compression is not None:
            raise ValueError("sparse_updates and distributed.grad_compression do not combine (the compression hooks take dense gradients): choose one")
        if self.sparse_updates and self.compile:
            raise ValueError("sparse_updates and compile do not combine (a compiled block graph has no sparse embedding gradient): choose one")
        return self
