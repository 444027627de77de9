"""How close `tunelab plan` comes to what each process of a multi-process run uses (about 10 minutes).

    .venv/bin/python bench/plan_accuracy_distributed.py   # bench/results/plan_accuracy_distributed.{json,md}

The multi-process companion of bench/plan_accuracy.py (same data, recipe shape and allocator
setting, `MALLOC_MMAP_THRESHOLD_=131072`): each row is a `tunelab train` job of 2 processes (4 for
fsdp+tp: 2 data-parallel groups of 2 tensor-parallel processes) under torchrun (gloo, one thread
each, fp32, 3 steps) with one strategy, at one global batch: ddp and fsdp draw `batch / 2` rows
per process, tp shares the whole batch, fsdp+tp gives each group half, pp runs it as 2
micro-batches through 2 stages. Measured: the largest `peak_rss_bytes_per_process` of the run's
summary.json (each process's VmHWM, model load included); estimated: `tunelab.plan.estimate` for
the same settings and devices, whose figure is the busiest device's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from plan_accuracy import LIVE_MALLOC, MiB, OUT, STEPS, make_data, recipe  # noqa: E402

from tunelab.bench.tables import write_results  # noqa: E402
from tunelab.hardware import cpu_model_name  # noqa: E402
from tunelab.plan import Settings, architecture_from_config, estimate  # noqa: E402
from tunelab.plan.model_config import load_config  # noqa: E402
from tunelab.plan.runtime import measure_cpu_runtime  # noqa: E402

#: Processes per job (fsdp+tp needs 4: 2 groups x tp degree 2).
PROCESSES = {"ddp": 2, "fsdp": 2, "tp": 2, "pp": 2, "fsdp+tp": 4}
TP_DEGREE = 2
#: (label, model, method, seq, global batch, strategy)
ROWS = [
    ("tiny-llama full", "tiny-llama", "full", 512, 4, "ddp"),
    ("tiny-llama full", "tiny-llama", "full", 512, 4, "fsdp"),
    ("tiny-llama full", "tiny-llama", "full", 512, 4, "tp"),
    ("tiny-llama full", "tiny-llama", "full", 512, 4, "pp"),
    ("tiny-llama full", "tiny-llama", "full", 512, 4, "fsdp+tp"),
    ("smollm2-135m lora", "smollm2-135m", "lora", 256, 4, "ddp"),
    ("smollm2-135m lora", "smollm2-135m", "lora", 256, 4, "fsdp"),
    ("smollm2-135m lora", "smollm2-135m", "lora", 256, 4, "pp"),
]


def per_process_batch(strategy: str, batch: int) -> tuple[int, int]:
    """``(batch_size, grad_accum)`` that give the global ``batch`` under ``strategy``."""
    if strategy in ("ddp", "fsdp"):
        return batch // PROCESSES[strategy], 1
    if strategy == "fsdp+tp":
        return batch // (PROCESSES[strategy] // TP_DEGREE), 1
    if strategy == "pp":
        return batch // PROCESSES[strategy], PROCESSES[strategy]
    return batch, 1


def run(spec: dict[str, Any], directory: Path, processes: int) -> dict[str, Any]:
    """One job of ``processes`` under torchrun; its summary.json."""
    subprocess.run(["rm", "-rf", str(directory)], check=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    path = directory.with_suffix(".yaml")
    path.write_text(json.dumps(spec))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", "29877",
                "-m", "tunelab.cli", "train", "--no-progress", str(path)]
    started = time.perf_counter()
    result = subprocess.run(launcher, capture_output=True, text=True, env={**os.environ, **LIVE_MALLOC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        raise RuntimeError(f"training failed ({path}): {result.stderr[-2000:]}")
    summary = json.loads((directory / "summary.json").read_text())
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    return summary


def main() -> None:
    data = OUT / "long_text.jsonl"
    make_data(data)
    runtime = measure_cpu_runtime(LIVE_MALLOC)
    rows = []
    for label, model, method, seq, batch, strategy in ROWS:
        batch_size, accum = per_process_batch(strategy, batch)
        spec = recipe(model, method, seq, batch_size, False, data, OUT / "distributed" / f"{label.replace(' ', '_')}-{strategy}")
        processes = PROCESSES[strategy]
        spec["train"].update(grad_accum=accum, distributed={"strategy": strategy, **({"tp": {"degree": TP_DEGREE}} if strategy == "fsdp+tp" else {})})
        summary = run(spec, Path(spec["output_dir"]), processes)
        arch = architecture_from_config(load_config(model), model)
        # the planner's batch: rows per process per step (under pp: per pipeline, split into micro-batches)
        settings = Settings(method=method, seq=seq, batch=batch_size * accum, checkpointing=False, precision="fp32", device="cpu", runtime_bytes=runtime,
                            strategy=strategy, devices=processes, microbatches=accum if strategy == "pp" else None,
                            tp_degree=TP_DEGREE if strategy == "fsdp+tp" else None)
        result = estimate(arch, settings)
        peaks = summary["peak_rss_bytes_per_process"]
        measured = max(peaks)
        row = {
            "label": label, "model": model, "method": method, "seq": seq, "batch": batch, "strategy": strategy, "processes": processes,
            "estimate_bytes": result.total, "estimate_moment": result.peak.name, "estimate_components_bytes": result.components,
            "measured_bytes": measured, "measured_per_process_bytes": peaks, "error_pct": round(100 * (result.total - measured) / measured, 1),
            "wall_s": summary["wall_s"], "cpu": summary["cpu"],
        }
        rows.append(row)
        print(f"{label} {strategy}: estimate {result.total / MiB:,.0f} MiB ({result.peak.name}), measured "
              f"{' / '.join(f'{p / MiB:,.0f}' for p in peaks)} MiB ({row['error_pct']:+.1f}%), {summary['wall_s']} s", flush=True)
    table = ["| run | seq x global batch | strategy | estimate MiB (busiest process) | measured MiB per process | error | peak moment |",
             "|---|---|---|---:|---:|---:|---|"]
    for row in rows:
        table.append(f"| {row['label']} | {row['seq']} x {row['batch']} | {row['strategy']} | {row['estimate_bytes'] / MiB:,.0f} | "
                     f"{' / '.join(f'{p / MiB:,.0f}' for p in row['measured_per_process_bytes'])} | {row['error_pct']:+.1f}% | {row['estimate_moment']} |")
    cpu = cpu_model_name()
    worst = max(abs(r["error_pct"]) for r in rows)
    note = (f"`tunelab plan --strategy S --devices N` against real N-process `tunelab train` jobs (2; 4 for fsdp+tp) on {cpu}, torch "
            f"{__import__('torch').__version__}, one thread per process, fp32, {STEPS} steps, MALLOC_MMAP_THRESHOLD_=131072; runtime overhead "
            f"measured {runtime / MiB:,.0f} MiB per process. Largest error: {worst:.1f}%.")
    write_results(REPO / "bench" / "results", "plan_accuracy_distributed", {"cpu": cpu, "runtime_bytes": runtime, "steps": STEPS,
                  "processes": PROCESSES, "live_malloc_env": LIVE_MALLOC}, rows, note, table)


if __name__ == "__main__":
    main()
