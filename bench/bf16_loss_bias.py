"""How far does each side's bf16 loss sit from fp32, batch by batch, at the initial weights?

A step-1 loss is one batch: on the short workload that is ~16 supervised tokens, and bf16 rounding
moves such a mean by up to ~1% on either side. This runs the benchmark's short workload for
``--batches`` steps at a learning rate too small to move any weight (1e-20), so every step is the
loss of the initial model on the next batch, once per side and precision, and reports the mean
and spread of each bf16 side's relative difference from fp32 on the same batches (tunelab's fp32
equals the Trainer's to ~4e-6 per batch, so the Trainer's fp32 is the reference). A bias in the
mean is a numerical difference; the spread is the rounding noise any bf16 run has.

    .venv/bin/python bench/bf16_loss_bias.py                 # SmolLM2-135M, 40 batches, ~8 minutes on 2 cores

Writes bench/results/bf16_loss_bias.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tunelab.bench.runner import run_side  # noqa: E402
from tunelab.bench.tables import write_results  # noqa: E402
from tunelab.bench.workload import Workload  # noqa: E402
from tunelab.hardware import cpu_model_name  # noqa: E402

RUNS = (("hf", "fp32"), ("hf", "bf16"), ("tunelab", "bf16"))
LABELS = {"hf": "Trainer + PEFT", "tunelab": "tunelab"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    losses = {}
    for side, precision in RUNS:  # each in its own process, as the benchmark runs them
        workload = Workload.named("short", model=args.model, steps=args.batches, seed=args.seed, precision=precision, lr=1e-20)
        losses[side, precision] = run_side(side, workload)["step_losses"]
        print(f"{LABELS[side]} {precision}: {len(losses[side, precision])} batches", flush=True)
    reference = losses["hf", "fp32"]
    rows, table = [], ["| side (bf16) | mean vs fp32 | sd | largest |", "|---|---:|---:|---:|"]
    for side, precision in RUNS[1:]:
        rel = [100 * (a - b) / b for a, b in zip(losses[side, precision], reference)]
        row = {"side": side, "mean_pct": statistics.mean(rel), "sd_pct": statistics.pstdev(rel), "max_abs_pct": max(map(abs, rel)), "per_batch_pct": rel}
        rows.append(row)
        table.append(f"| {LABELS[side]} | {row['mean_pct']:+.2f}% | {row['sd_pct']:.2f}% | {row['max_abs_pct']:.2f}% |")
    note = (f"Short workload, {args.model}, {args.batches} batches of 8 at the initial weights (seed {args.seed}); each bf16 side's "
            f"loss relative to the Trainer's fp32 loss on the same batch. CPU: {cpu_model_name()}.")
    write_results(REPO / "bench" / "results", "bf16_loss_bias", {"model": args.model, "batches": args.batches, "losses": {f"{s} {p}": v for (s, p), v in losses.items()}},
                  rows, note, table)


if __name__ == "__main__":
    main()
