"""What the benchmark measures besides time: GEMM peak, memory high-water mark, model FLOPs.

MFU divides the model FLOPs a step *needs* by the machine's measured GEMM peak. "Needs" is
counted from the data, the same for both sides: every real (non-pad) token goes through every
decoder block forward and back (frozen weights get input gradients only, LoRA weights get both),
attention over the tokens before it in its own example, and the LM head only where a label is
supervised. Work a trainer spends on padding or on logits nobody reads is not credited. A row that
holds the batch's shared prompt prefix once (``shared_prefix`` lever) is credited with the prefix
once: MFU stays a fraction of what the machine can do, and the work avoided shows as speed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from tunelab.data import IGNORE_INDEX, Example
from tunelab.data.collate import shared_prefix_length
from tunelab.hardware import peak_rss_bytes


def gemm_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Best-of-``repeats`` GFLOP/s of one ``size``² matmul in ``dtype`` on ``device`` (the MFU
    denominator; on a GPU pass a size that fills it, e.g. 8192)."""
    a, b = (torch.randn(size, size).to(device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)  # kernel selection and first-touch memory are not throughput
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so a clock read after it measures the work (no-op on a CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def peak_device_mb(device: str) -> float | None:
    """The GPU's allocated-memory high-water mark in MiB (None on a CPU: the RSS is the measure)."""
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark in MiB."""
    return peak_rss_bytes() / 2**20


@dataclass(frozen=True)
class ModelShape:
    """The sizes the FLOP count needs, read from a (PEFT-wrapped) causal LM."""

    layers: int
    attention_width: int  # heads x head_dim: the width of QK^T and PV products
    lm_head: int  # vocab x hidden
    frozen_linear: int  # weights of the decoder blocks' frozen linear layers
    lora: int  # trainable adapter parameters

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def model_shape(model: torch.nn.Module) -> ModelShape:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    output = model.get_output_embeddings()
    frozen_linear = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            if module.weight.requires_grad:
                lora += module.weight.numel()
            else:
                frozen_linear += module.weight.numel()
    return ModelShape(
        layers=config.num_hidden_layers,
        attention_width=config.num_attention_heads * head_dim,
        lm_head=output.weight.numel(),
        frozen_linear=frozen_linear,
        lora=lora,
    )


def example_flops(example: Example, shape: ModelShape) -> float:
    """Training FLOPs (forward + backward) ``example`` needs: see the module docstring."""
    n = len(example.input_ids)
    supervised = sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)
    linear = n * (4 * shape.frozen_linear + 6 * shape.lora)
    attention = 3 * shape.layers * 4 * shape.attention_width * n * (n + 1) / 2
    return linear + attention + supervised * 4 * shape.lm_head


def _prefix_flops(tokens: int, shape: ModelShape) -> float:
    """What ``example_flops`` counts for the first ``tokens`` tokens of an unsupervised prompt."""
    return tokens * (4 * shape.frozen_linear + 6 * shape.lora) + 3 * shape.layers * 4 * shape.attention_width * tokens * (tokens + 1) / 2


def step_flops(examples: list[Example], shape: ModelShape, shared_prefix: bool) -> float:
    """The FLOPs one step's examples need, their common prefix counted once when the row shares it."""
    total = sum(example_flops(e, shape) for e in examples)
    if shared_prefix:
        total -= (len(examples) - 1) * _prefix_flops(shared_prefix_length(examples), shape)
    return total


def real_tokens(examples: list[Example]) -> int:
    return sum(len(e.input_ids) for e in examples)


def supervised_tokens(examples: list[Example]) -> int:
    return sum(sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in examples)
