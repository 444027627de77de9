"""What is being planned: method, batch shape, precision and how devices share the work.

One frozen dataclass, validated once, so every rule downstream can trust its fields. The
defaults are tunelab's own (LoRA r=16 with dropout 0.05 on peft's per-architecture targets,
AdamW, the fused loss unless the strategy shards the head) so a plan describes the run that
``tunelab train`` would make with the same choices.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tunelab.errors import UserError

METHODS = ("full", "lora", "qlora")
STRATEGIES = ("ddp", "fsdp", "tp", "fsdp+tp", "pp")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adam", "sgd")
DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class Settings:
    """One training configuration to estimate, per device."""

    method: str = "lora"
    seq: int = 2048
    #: Examples (rows of ``seq`` tokens) per micro-batch per process; under ``pp`` per pipeline.
    batch: int = 8
    precision: str = "fp32"
    checkpointing: bool = False
    adapter_rank: int = 16
    #: ``auto`` (peft's per-architecture default, q_proj and v_proj for Llama), ``all-linear``,
    #: or block linear names such as ``("q_proj", "v_proj")``.
    adapter_targets: str | tuple[str, ...] = "auto"
    adapter_dropout: float = 0.05
    optimizer: str = "adamw"
    strategy: str = "ddp"
    devices: int = 1
    #: Tensor-parallel degree (``tp``, ``fsdp+tp``); None picks the strategy's default.
    tp_degree: int | None = None
    #: Pipeline micro-batches per step (``pp``); None means one per stage.
    microbatches: int | None = None
    device: str = "cpu"
    #: Fraction of positions whose next token carries loss (1.0: raw text; chat SFT is lower).
    supervised_fraction: float = 1.0
    #: None: the engine's choice (chunked fused head + loss, except under a sharded head).
    fused_loss: bool | None = None
    #: Bytes the process holds before any model exists (Python, torch, CUDA context).
    runtime_bytes: int = 0

    def __post_init__(self) -> None:
        checks = {
            "--method": (self.method in METHODS, f"choose one of {', '.join(METHODS)}"),
            "--strategy": (self.strategy in STRATEGIES, f"choose one of {', '.join(STRATEGIES)}"),
            "--precision": (self.precision in PRECISIONS, f"choose one of {', '.join(PRECISIONS)}"),
            "--optimizer": (self.optimizer in OPTIMIZERS, f"choose one of {', '.join(OPTIMIZERS)}"),
            "--seq": (self.seq >= 2, "at least 2 tokens"),
            "--batch": (self.batch >= 1, "at least 1 example"),
            "--devices": (self.devices >= 1, "at least 1"),
            "--lora-r": (self.adapter_rank >= 1, "at least 1"),
            "--supervised": (0 < self.supervised_fraction <= 1, "a fraction in (0, 1]"),
        }
        for option, (ok, hint) in checks.items():
            if not ok:
                raise UserError(f"bad value for {option}", where=option, hint=hint)
        if self.strategy != "ddp" and self.devices < 2:
            raise UserError(f"strategy {self.strategy} shares the work of several devices", where="--strategy", hint="set --devices 2 or more, or use ddp")
        degree = self.tensor_parallel
        if degree > self.devices or self.devices % degree:
            raise UserError(f"a tensor-parallel degree of {degree} does not divide {self.devices} devices", where="--tp-degree")

    @property
    def autocast(self) -> bool:
        """Mixed precision: matmuls in bf16/fp16, trainable weights kept fp32."""
        return self.precision != "fp32"

    @property
    def compute_bytes(self) -> int:
        return 2 if self.autocast else 4

    @property
    def tensor_parallel(self) -> int:
        """Devices one layer's linears are split over (1 outside ``tp`` and ``fsdp+tp``)."""
        if self.strategy == "tp":
            return self.tp_degree or self.devices
        if self.strategy == "fsdp+tp":
            return self.tp_degree or _largest_divisor_up_to(self.devices, min(8, self.devices // 2))
        return 1

    @property
    def data_shards(self) -> int:
        """Devices that parameters, gradients and optimizer state are sharded over (FSDP)."""
        if self.strategy == "fsdp":
            return self.devices
        if self.strategy == "fsdp+tp":
            return self.devices // self.tensor_parallel
        return 1

    @property
    def stages(self) -> int:
        return self.devices if self.strategy == "pp" else 1

    @property
    def uses_fused_loss(self) -> bool:
        """The engine computes the loss from the head in row chunks unless FSDP shards the head
        (then the logits come from the model's forward: docs/scaling_out.md)."""
        if self.fused_loss is not None:
            return self.fused_loss
        return self.data_shards == 1

    def with_batch(self, batch: int) -> Settings:
        return replace(self, batch=batch)


def _largest_divisor_up_to(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, limit) + 1) if n % d == 0)
