"""Gradient compression in data-parallel training: bytes per step, step time and the loss curve
of each DDP communication hook against the plain all-reduce, in the same run.

Workload: full fine-tuning of tiny-llama-20m (~20M parameters, so ~80 MB of fp32 gradients per
step) on the fortunes text (examples/data/fortunes_text), 2 processes x batch 4 under torchrun
(gloo), one thread each, 40 steps, AdamW lr 3e-4 constant, fp32, the same seed for every method.
Each method runs once; "bytes/step" is what one process hands to its collectives (from
metrics.jsonl's ``comm_bytes``), "step s" the mean step time after the first 5 steps.

    .venv/bin/python bench/grad_compression.py      # bench/results/grad_compression.{json,md,png}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tunelab.bench.distributed_runs import mean_step_seconds, train_records, train_under_torchrun  # noqa: E402
from tunelab.bench.tables import write_results  # noqa: E402
from tunelab.hardware import cpu_model_name  # noqa: E402

DATA = REPO / "examples" / "data" / "fortunes_text" / "train.jsonl"
STEPS, WARM = 40, 5
METHODS = {
    "plain all-reduce (fp32)": "{method: none}",
    "fp16": "{method: fp16}",
    "bf16": "{method: bf16}",
    "PowerSGD rank 4": "{method: powersgd, rank: 4, start_step: 5}",
    "PowerSGD rank 1": "{method: powersgd, rank: 1, start_step: 5}",
    "top-k 1% + error feedback": "{method: topk, ratio: 0.01}",
    "sign, majority vote": "{method: sign}",
}
RECIPE = """model: {{name: tiny-llama-20m}}
data: {{train: {data}, format: text, val_fraction: 0.0, max_length: 128}}
train: {{lr: 3.0e-4, max_steps: {steps}, batch_size: 4, precision: fp32, schedule: constant, eval_before: false, threads: 1,
        distributed: {{grad_compression: {compression}}}}}
output_dir: {out}
"""


def run(name: str, compression: str, work: Path) -> dict[str, Any]:
    out = work / "".join(c if c.isalnum() else "_" for c in name)
    recipe = work / f"{out.name}.yaml"
    recipe.write_text(RECIPE.format(data=DATA, steps=STEPS, compression=compression, out=out))
    train_under_torchrun(recipe, out)
    records = train_records(out)
    return {"method": name, "bytes_per_step": statistics.mean(r["comm_bytes"] for r in records[WARM:]),
            "dense_bytes_per_step": statistics.mean(r["comm_dense_bytes"] for r in records[WARM:]),
            "step_seconds": mean_step_seconds(records, WARM), "losses": [r["loss"] for r in records]}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunelab.report.plots import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        ax.plot(range(1, len(row["losses"]) + 1), row["losses"], label=row["method"])
    ax.set_xlabel("optimizer step (2 processes x 4 rows)")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "bench-results" / "grad_compression")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.time()
    rows = [run(name, compression, args.work) for name, compression in METHODS.items()]
    plain = rows[0]
    table = ["| gradients sent as | bytes/step (one process) | vs fp32 | step s | vs fp32 | loss at step 20 | loss at step 40 |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        table.append(f"| {row['method']} | {row['bytes_per_step'] / 2**20:.2f} MiB | {row['bytes_per_step'] / plain['bytes_per_step']:.3f}x | "
                     f"{row['step_seconds']:.2f} | {row['step_seconds'] / plain['step_seconds']:.2f}x | {row['losses'][19]:.3f} | {row['losses'][-1]:.3f} |")
    meta = {"cpu": cpu_model_name(), "steps": STEPS, "bench_seconds": round(time.time() - began)}
    note = (f"tiny-llama-20m full fine-tuning, 2 gloo processes x 4 rows, {STEPS} steps, one seed, one thread per process; "
            f"CPU: {meta['cpu']}. Loopback gloo: communication is a memory copy here, so time saved on a network is not measured.")
    write_results(args.out, "grad_compression", meta, rows, note, table)
    plot(rows, args.out / "grad_compression.png")


if __name__ == "__main__":
    main()
