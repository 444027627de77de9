"""ddp, fsdp, tp and pp in the same run: what each process keeps, what a step costs, the same losses.

Workload: full fine-tuning of tiny-llama-20m (~20M parameters: 80 MB of fp32 weights, as much
again of gradients and twice that of Adam moments) on the fortunes text
(examples/data/fortunes_text), 2 processes under torchrun (gloo, loopback), one thread each, 30
steps, AdamW lr 3e-4 constant, fp32, the same seed and the same global batch of 8 rows for every
strategy (ddp/fsdp: 4 rows per process; tp: both processes see the 8 rows; pp: 2 micro-batches of
4 flow through the 2 stages), run one after the other. "optimizer state" is what one process's
optimizer holds (summary.json: rank 0's); "step s" the mean step time after the first 5 steps; the
peak RSS is rank 0's and includes loading the whole model before it is split, so it shows little of
the saving on a model this small. ddp and fsdp train on packed rows; pp pads every row to the
longest example (its stages exchange fixed shapes), tp computes every row's padding too: the
padding is counted in their step time.

    .venv/bin/python bench/strategies.py       # bench/results/strategies.{json,md}
"""

from __future__ import annotations

import argparse
import json
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
STEPS, WARM = 30, 5
#: strategy -> (batch_size, grad_accum): the same global batch of 8 rows.
STRATEGIES = {"ddp": (4, 1), "fsdp": (4, 1), "tp": (8, 1), "pp": (4, 2)}
RECIPE = """model: {{name: tiny-llama-20m}}
data: {{train: {data}, format: text, val_fraction: 0.0, max_length: 128}}
method: {{freeze: {{base: false}}}}
train: {{lr: 3.0e-4, max_steps: {steps}, batch_size: {batch}, grad_accum: {accum}, precision: fp32, schedule: constant, eval_before: false, threads: 1,
        save_every: 1000, distributed: {{strategy: {strategy}}}}}
output_dir: {out}
"""


def run(strategy: str, work: Path) -> dict[str, Any]:
    out = work / strategy
    recipe = work / f"{strategy}.yaml"
    batch, accum = STRATEGIES[strategy]
    recipe.write_text(RECIPE.format(data=DATA, steps=STEPS, batch=batch, accum=accum, strategy=strategy, out=out))
    train_under_torchrun(recipe, out, port=29812)
    records = train_records(out)
    summary = json.loads((out / "summary.json").read_text())
    return {"strategy": strategy, "step_seconds": mean_step_seconds(records, WARM), "optimizer_state_bytes": summary["optimizer_state_bytes"],
            "peak_rss_bytes": summary["peak_rss_bytes"], "trainable_params": summary["trainable_params"], "losses": [r["loss"] for r in records]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "bench-results" / "strategies")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.time()
    rows = [run(strategy, args.work) for strategy in STRATEGIES]
    ddp = rows[0]
    table = ["| strategy | optimizer state per process | vs ddp | step s | vs ddp | peak RSS, rank 0 | loss at step 30 | largest loss difference vs ddp |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        gap = max(abs(a - b) for a, b in zip(row["losses"], ddp["losses"]))
        table.append(f"| {row['strategy']} | {row['optimizer_state_bytes'] / 2**20:.1f} MiB | {row['optimizer_state_bytes'] / ddp['optimizer_state_bytes']:.2f}x | "
                     f"{row['step_seconds']:.2f} | {row['step_seconds'] / ddp['step_seconds']:.2f}x | {row['peak_rss_bytes'] / 2**20:,.0f} MiB | "
                     f"{row['losses'][-1]:.4f} | {gap:.1e} |")
    meta = {"cpu": cpu_model_name(), "steps": STEPS, "bench_seconds": round(time.time() - began)}
    note = (f"tiny-llama-20m full fine-tuning ({ddp['trainable_params']:,} parameters), 2 gloo processes, a global batch of 8 rows, {STEPS} steps, "
            f"one seed, one thread per process, run one after the other; CPU: {meta['cpu']}. Loopback gloo: the collectives and the pipeline's "
            "sends are memory copies here, so a network's cost is not measured.")
    write_results(args.out, "strategies", meta, rows, note, table)


if __name__ == "__main__":
    main()
