"""The benchmark workload: one description both sides build their run from.

The data goes through tunelab's own pipeline once per side (template, completion-only masks,
truncation), so both trainers see identical token ids and labels; the step order is the engine's
computed permutation, which the Hugging Face side replays with a sequential sampler.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

from tunelab.data import DataConfig, Example, build_datasets
from tunelab.train.samplers import epoch_permutation

#: tunelab's throughput levers that a run can switch off, and what each does.
LEVERS = {
    "packing": "padding-free packed rows instead of right-padded batches",
    "sliced_logits": "LM head and loss only at supervised positions",
    "fused_loss": "LM head + cross-entropy in row chunks, the [tokens, vocab] logits never whole",
    "varlen": "attention per packed example instead of one block-diagonal mask",
    "shared_prefix": "a batch's common unsupervised prompt prefix held once per packed row",
    "unread_inputs": "packed rows without the inputs no target reads: each example's tail and its last supervised token",
    "sliced_last_mlp": "the last block's MLP only at the positions the loss reads",
    "low_precision_frozen": "frozen weights held in the autocast dtype",
    "bucketing": "packed rows padded to a multiple of 16 tokens (64 below 256) where matmul kernels are built per shape (CPU bf16/fp16)",
    "fused_mlp": "a LoRA-adapted gated MLP as one function with a hand-written backward",
    "fused_qkv": "LoRA-adapted q/k/v projections as one function (one down-projection matmul for the three)",
    "loss_buffers": "the fused loss's [rows, vocab] buffers kept from step to step instead of allocated (and page-faulted) anew",
    "chunked_rope": "RoPE's rotate_half by chunk: the same values, a backward without two whole-size zero tensors per call",
    "fused_blocks": "each decoder block's attention and MLP halves (norm, LoRA projections, RoPE, attention, residual) as two functions with hand-written backwards",
    "stacked_projections": "inside the fused blocks, projections reading one input as two matmuls: frozen weights and adapter down-projections stacked, up-projections block-diagonal",
    "bit_dropout": "LoRA dropout masks from 16 random bits per element instead of bernoulli_ draws (with --lora-dropout)",
    "compile": "regional torch.compile of the transformer blocks (one-time cost in the first steps)",
    "checkpointing": "activation checkpointing: blocks recomputed in the backward pass (memory for time)",
}
#: The levers tunelab's engine uses by default (compile is opt-in: its one-time cost is minutes;
#: checkpointing is the recipe's ``train.gradient_checkpointing``, off by default).
DEFAULT_LEVERS = ("packing", "sliced_logits", "fused_loss", "varlen", "shared_prefix", "unread_inputs", "sliced_last_mlp",
                  "low_precision_frozen", "bucketing", "fused_mlp", "fused_qkv", "loss_buffers", "chunked_rope",
                  "fused_blocks", "stacked_projections", "bit_dropout")

EXAMPLES_DIR = Path(__file__).resolve().parents[3] / "examples" / "data"


class WorkloadFiles(NamedTuple):
    train: Path
    validation: Path
    shape: str  # the data pipeline's example shape (see tunelab.data.build_datasets)
    about: str


#: The workloads, by name, and what makes each a different test of the engine.
WORKLOADS = {
    "short": WorkloadFiles(EXAMPLES_DIR / "rt_sentiment_train.jsonl", EXAMPLES_DIR / "rt_sentiment_test.jsonl", "sft",
                           "Rotten Tomatoes chat rows: ~70-token prompts, 2-token supervised answers (logit slicing skips most of the LM head)"),
    "long": WorkloadFiles(EXAMPLES_DIR / "fortunes_text" / "train.jsonl", EXAMPLES_DIR / "fortunes_text" / "test.jsonl", "text",
                          "fortune-cookie text, continued pretraining: every token supervised (the LM head and loss over the vocabulary dominate)"),
}


@dataclass(frozen=True)
class Workload:
    """What both sides train: model, data, LoRA, optimizer settings and the number of steps."""

    model: str = "smollm2-135m"
    name: str = "short"
    train_file: str = str(WORKLOADS["short"].train)
    validation_file: str = str(WORKLOADS["short"].validation)
    #: Held-out rows scored after training (every row of both files): a short-workload row has 2
    #: supervised tokens, so the 32 rows used before were a 64-token sample.
    validation_examples: int = 200
    max_length: int = 512
    steps: int = 12
    batch_size: int = 8
    lr: float = 5e-4
    lora_r: int = 16
    lora_alpha: float = 32.0
    #: The adapters' input dropout on both sides: 0 in the published figures; the shipped recipes use 0.05.
    lora_dropout: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "auto"
    #: "cpu" or "cuda": where both sides train (the GPU check, bench/gpu_check.sh, runs "cuda").
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    #: tunelab levers on in this run (see ``LEVERS``); toggling one measures what it pays.
    levers: tuple[str, ...] = DEFAULT_LEVERS

    def __post_init__(self) -> None:
        unknown = set(self.levers) - set(LEVERS)
        if unknown:
            raise ValueError(f"unknown lever(s) {sorted(unknown)}; known: {', '.join(LEVERS)}")

    @classmethod
    def named(cls, name: str, **settings: object) -> Workload:
        """The workload ``name`` of ``WORKLOADS`` with ``settings`` (model, steps, ...)."""
        files = WORKLOADS[name]
        return cls(name=name, train_file=str(files.train), validation_file=str(files.validation), **settings)  # type: ignore[arg-type]

    def uses(self, lever: str) -> bool:
        return lever in self.levers

    def toggled(self, lever: str) -> Workload:
        """The same workload with ``lever`` switched the other way."""
        levers = tuple(x for x in self.levers if x != lever) if self.uses(lever) else (*self.levers, lever)
        return replace(self, levers=levers)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        fields = json.loads(text)
        return cls(**{**fields, "levers": tuple(fields.get("levers", DEFAULT_LEVERS))})


@dataclass(frozen=True)
class WorkloadData:
    """Training examples in the order the steps consume them, plus the held-out examples."""

    train: list[Example]
    ordered: list[Example]
    validation: list[Example]

    def step_examples(self, step: int, batch_size: int) -> list[Example]:
        return self.ordered[step * batch_size : (step + 1) * batch_size]


def data_config(workload: Workload, workdir: Path) -> DataConfig:
    """The recipe's ``data:`` section, with the validation file cut to ``validation_examples`` rows."""
    lines = Path(workload.validation_file).read_text().splitlines()[: workload.validation_examples]
    validation = workdir / "validation.jsonl"
    validation.write_text("\n".join(lines) + "\n")
    return DataConfig(train=workload.train_file, validation=str(validation), max_length=workload.max_length)


def build_workload_data(workload: Workload, tokenizer, workdir: Path) -> WorkloadData:
    """Tokenized, masked examples; ``ordered`` is epoch 0 of the engine's permutation."""
    shape = WORKLOADS[workload.name].shape if workload.name in WORKLOADS else "sft"
    bundle = build_datasets(data_config(workload, workdir), tokenizer, shape=shape, seed=workload.seed)  # type: ignore[arg-type]
    needed = workload.steps * workload.batch_size
    if needed > len(bundle.train):
        raise ValueError(f"{workload.steps} steps x {workload.batch_size} need {needed} examples; the data has {len(bundle.train)}")
    order = epoch_permutation(len(bundle.train), workload.seed, 0)
    return WorkloadData(bundle.train, [bundle.train[i] for i in order], bundle.validation)
