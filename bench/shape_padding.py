"""Does padding the vocabulary to a multiple of 64 make the LM head faster? Measured, per precision.

Adding one token to a tokenizer (a pad token, LLaVA's ``<image>``: ``tunelab vlm assemble`` takes
SmolLM2 from 49,152 to 49,153 rows) leaves the output head with an odd row count, and the common
advice is to pad it to a multiple of 64 (``resize_token_embeddings(pad_to_multiple_of=64)``) so
the GEMMs tile evenly on tensor cores / AMX tiles / SIMD registers. This times the head's three
products of a training step (logits ``x·Wᵀ``, the input gradient ``g·W`` and the weight gradient
``gᵀ·x``) at SmolLM2's width for 49,152 (already a multiple of 64), 49,153 (one added token) and
49,216 (that padded to 64), in fp32 and in bf16 where the device has native bf16, the shapes taking
turns in one process (median of ``--rounds``), so the ratios are side by side.

    .venv/bin/python bench/shape_padding.py                 # this CPU, ~1 min
    .venv/bin/python bench/shape_padding.py --device cuda   # a GPU (bench/gpu_check.sh runs it)

Writes bench/results/shape_padding[_cuda].{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tunelab.bench.measure import synchronize  # noqa: E402
from tunelab.bench.tables import write_results  # noqa: E402
from tunelab.hardware import configure_matmul, cpu_flags, cpu_model_name  # noqa: E402

HIDDEN = 576
#: Tokens per step: a CPU batch, and a GPU one (a GPU needs more work per product to be timed at all).
TOKENS = {"cpu": 512, "cuda": 8192}
#: Head steps per timed sample: one GPU step is ~0.1 ms, too short to time alone.
STEPS_PER_SAMPLE = {"cpu": 1, "cuda": 20}
VOCABS = {"49,152 (SmolLM2)": 49152, "49,153 (+1 token)": 49153, "49,216 (+1, padded to 64)": 49216}


def head_step(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> None:
    """The LM head's three GEMMs of one training step."""
    x @ weight.t()
    grad @ weight
    grad.t() @ x


def time_shapes(device: str, dtype: torch.dtype, rounds: int) -> dict[str, float]:
    """Median milliseconds per head step for each vocabulary size, the sizes taking turns."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for label, vocab in VOCABS.items():
        x = torch.randn(TOKENS[device], HIDDEN, generator=generator).to(device, dtype)
        weight = torch.randn(vocab, HIDDEN, generator=generator).to(device, dtype)
        grad = torch.randn(TOKENS[device], vocab, generator=generator).to(device, dtype)
        tensors[label] = (x, weight, grad)
        head_step(x, weight, grad)  # warm-up: kernel selection, first-touch of memory
    times: dict[str, list[float]] = {label: [] for label in VOCABS}
    for _ in range(rounds):
        for label, (x, weight, grad) in tensors.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(STEPS_PER_SAMPLE[device]):
                head_step(x, weight, grad)
            synchronize(device)
            times[label].append((time.perf_counter() - start) * 1e3 / STEPS_PER_SAMPLE[device])
    return {label: statistics.median(values) for label, values in times.items()}


def native_bf16(device: str) -> bool:
    return torch.cuda.is_bf16_supported() if device == "cuda" else bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where the JSON and Markdown go")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    configure_matmul(torch.device(args.device))  # fp32 on TF32 tensor cores where tunelab would use them
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if native_bf16(args.device) else {})}
    rows, table = [], ["| precision | vocabulary rows | ms per head step | vs 49,152 | vs 49,153 |", "|---|---|---:|---:|---:|"]
    for name, dtype in dtypes.items():
        ms = time_shapes(args.device, dtype, args.rounds)
        base, odd = ms["49,152 (SmolLM2)"], ms["49,153 (+1 token)"]
        for label, value in ms.items():
            flops_scale = VOCABS[label] / 49152  # same work per row: a fair kernel scales with the rows
            rows.append({"precision": name, "vocab": VOCABS[label], "ms": value, "per_row_vs_base": value / base / flops_scale})
            table.append(f"| {name} | {label} | {value:.3f} | {value / base:.3f}x | {value / odd:.3f}x |")
    machine = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model_name()
    note = (f"The LM head's three GEMMs of a training step ({TOKENS[args.device]} tokens x {HIDDEN} hidden), median of {args.rounds} rounds, "
            f"sizes taking turns, {torch.get_num_threads()} thread(s). Device: {machine}. The padded head does 0.13% more work "
            "than the +1 one, so equal times mean padding gains nothing.")
    write_results(args.out, "shape_padding" + ("_cuda" if args.device == "cuda" else ""),
                  {"device": machine, "threads": torch.get_num_threads()}, rows, note, table)


if __name__ == "__main__":
    main()
