"""How close is each side's bf16 LoRA gradient to the fp32 one, batch by batch, at the same weights?

The loss of one batch (bench/bf16_loss_bias.py) says whether a bf16 forward is biased; whether a
bf16 run *trains* like fp32 depends on its gradients. This runs the benchmark's short workload for
``--batches`` steps at a learning rate too small to move any weight (1e-20) and no clipping, with
every LoRA B set to the same small random values on every side (at peft's init B is zero, so A's
gradient would be zero too), and records each step's LoRA gradient: once by the Trainer in fp32 (the
reference), once by the Trainer in bf16 (autocast) and once by tunelab in bf16 (its engine: frozen
weights cast to bf16, fused MLP and q/k/v, fused loss). Reported per side and per group of adapters
(attention / MLP, A / B): the cosine with the fp32 gradient and the relative error
||g - g_fp32|| / ||g_fp32||, mean and worst over the batches.

    .venv/bin/python bench/bf16_grad_fidelity.py             # SmolLM2-135M, 24 batches, ~6 minutes on 2 cores

Writes bench/results/bf16_grad_fidelity.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tunelab.bench.gradients import GradientRecorder, compare  # noqa: E402
from tunelab.bench.sides import run_hf, run_tunelab  # noqa: E402
from tunelab.bench.tables import write_results  # noqa: E402
from tunelab.bench.workload import Workload  # noqa: E402
from tunelab.hardware import cpu_model_name  # noqa: E402

RUNS = (("Trainer + PEFT", run_hf, "fp32"), ("Trainer + PEFT", run_hf, "bf16"), ("tunelab", run_tunelab, "bf16"))
GROUPS = {
    "attention A": ("self_attn", "lora_A"), "attention B": ("self_attn", "lora_B"),
    "MLP A": ("mlp", "lora_A"), "MLP B": ("mlp", "lora_B"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--b-std", type=float, default=0.005, help="std of the LoRA B values (12 Adam steps at lr 5e-4 move B by ~6e-3)")
    args = parser.parse_args()
    recorded = {}
    for label, run, precision in RUNS:
        workload = Workload.named("short", model=args.model, steps=args.batches, seed=args.seed, precision=precision, lr=1e-20, max_grad_norm=1e9)
        recorder = GradientRecorder(args.b_std, args.seed)
        with tempfile.TemporaryDirectory() as workdir:
            run(workload, Path(workdir), probe=recorder)
        recorded[label, precision] = recorder.steps
        print(f"{label} {precision}: {len(recorder.steps)} gradients of {len(recorder.steps[0])} adapters", flush=True)
    reference = recorded["Trainer + PEFT", "fp32"]
    rows = []
    table = ["| side (bf16) | adapters | cosine with fp32, mean | worst | relative error, mean | worst |", "|---|---|---:|---:|---:|---:|"]
    for label, _, precision in RUNS[1:]:
        for group, parts in {"all": (), **GROUPS}.items():
            pairs = [compare(s, r, parts) for s, r in zip(recorded[label, precision], reference)]
            cosines, errors = [c for c, _ in pairs], [e for _, e in pairs]
            row = {"side": label, "group": group, "cosine_mean": statistics.mean(cosines), "cosine_min": min(cosines),
                   "rel_error_mean": statistics.mean(errors), "rel_error_max": max(errors), "per_batch_rel_error": errors}
            rows.append(row)
            table.append(f"| {label} | {group} | {row['cosine_mean']:.5f} | {row['cosine_min']:.5f} | {row['rel_error_mean']:.4f} | {row['rel_error_max']:.4f} |")
    note = (f"Short workload, {args.model}, {args.batches} batches of 8 (seed {args.seed}), LoRA r=16 on every linear layer with B ~ "
            f"N(0, {args.b_std}) on every side, learning rate 1e-20, no clipping; each bf16 side's LoRA gradient against the "
            f"Trainer's fp32 gradient on the same batch and weights. CPU: {cpu_model_name()}.")
    write_results(REPO / "bench" / "results", "bf16_grad_fidelity", {"model": args.model, "batches": args.batches, "b_std": args.b_std}, rows, note, table)


if __name__ == "__main__":
    main()
