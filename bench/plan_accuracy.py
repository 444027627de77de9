"""How close `tunelab plan` comes to the memory real training runs use (about 12 minutes).

    .venv/bin/python bench/plan_accuracy.py          # bench/results/plan_accuracy.{json,md}

Every row is a real `tunelab train` process on this CPU (one thread, fp32, AdamW, 3 steps, so the
peak is a steady step's: the optimizer state exists from step 1 on), on raw text rows cut to
exactly `seq` tokens and packed `batch` to a step (examples/data/heldout/fortunes.txt joined into
long rows), no validation split. Measured: `summary.json`'s `peak_rss_bytes` (the process's VmHWM,
model load included). Estimated: `tunelab.plan.estimate` for the same settings, with the runtime
overhead measured here by the planner's own probe (a process that imports the training engine
and nothing else) and no other constant.

The processes run with `MALLOC_MMAP_THRESHOLD_=131072`: glibc then returns every freed block of
128 KiB or more to the kernel at once, so the resident set follows the bytes the process holds,
which is what the planner estimates. With glibc's defaults, freed activations stay in the heap
(bench/README.md, "Peak memory and glibc"); the rows marked `glibc default` run the same
settings without the variable to show by how much, and are not part of the accuracy target.

A last row compares the planner with a published figure for a large model on a GPU: torchtune's
README at v0.2.0 (table "Peak Memory per GPU", commit 0217d44, May 2024): LoRA on Llama2-7B,
1 x RTX 4090, batch 4, sequence 2048, 21.3 GB, with the config it links
(recipes/configs/llama2/7B_lora_single_device.yaml: LoRA r=8 on q_proj and v_proj, bf16,
activation checkpointing, AdamW, full-vocabulary logits and torch's cross-entropy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tunelab.bench.tables import write_results  # noqa: E402
from tunelab.hardware import cpu_model_name  # noqa: E402
from tunelab.plan import Settings, architecture_from_config, estimate  # noqa: E402
from tunelab.plan.model_config import load_config  # noqa: E402
from tunelab.plan.runtime import measure_cpu_runtime  # noqa: E402

OUT = REPO / "runs" / "plan_accuracy"
TEXT = REPO / "examples" / "data" / "heldout" / "fortunes.txt"
LARGE_CONFIG = REPO / "examples" / "plan" / "llama-2-7b.json"
STEPS = 3
LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}
MiB = 2**20

#: (label, model, method, seq, batch, checkpointing, also measured with glibc's default malloc)
ROWS = [
    ("tiny-llama full", "tiny-llama", "full", 2048, 8, False, False),
    ("tiny-llama full", "tiny-llama", "full", 512, 2, False, False),
    ("tiny-llama lora", "tiny-llama", "lora", 2048, 8, False, False),
    ("tiny-llama lora", "tiny-llama", "lora", 512, 2, False, False),
    ("smollm2-135m full", "smollm2-135m", "full", 256, 4, False, True),
    ("smollm2-135m lora", "smollm2-135m", "lora", 512, 4, False, True),
    ("smollm2-135m lora", "smollm2-135m", "lora", 256, 2, False, False),
    ("smollm2-135m lora, checkpointing", "smollm2-135m", "lora", 512, 4, True, False),
    ("smollm2-135m qlora", "smollm2-135m", "qlora", 256, 2, False, False),
]

#: torchtune v0.2.0 README, "Peak Memory per GPU (GB)": 1 x RTX 4090, LoRA, Llama2-7B, batch 4, seq 2048.
PUBLISHED = {
    "source": "torchtune README at v0.2.0, table 'Peak Memory per GPU' (added in commit 0217d44, 2024-05-09)",
    "url": "https://github.com/pytorch/torchtune/blob/v0.2.0/README.md",
    "config_url": "https://github.com/pytorch/torchtune/blob/v0.2.0/recipes/configs/llama2/7B_lora_single_device.yaml",
    "setting": "LoRA r=8 (q_proj, v_proj, dropout 0.05), Llama2-7B, 1 x RTX 4090, bf16, activation checkpointing, AdamW, batch 4, seq 2048",
    "peak_bytes": 21.3e9,  # torchtune divides torch.cuda memory statistics by 1e9
}


def make_data(path: Path, rows: int = 64, chars: int = 20_000) -> None:
    """Long raw-text rows (every one longer than any seq here, in tokens of either tokenizer)."""
    text = " ".join(TEXT.read_text().split())
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for i in range(rows):
            start = (i * 7919) % (len(text) - chars)
            handle.write(json.dumps({"text": text[start:start + chars]}) + "\n")


def recipe(model: str, method: str, seq: int, batch: int, checkpointing: bool, data: Path, out: Path) -> dict[str, Any]:
    methods = {"full": {}, "lora": {"lora": {}}, "qlora": {"lora": {"qlora": True}}}
    return {
        "model": {"name": model},
        "data": {"train": str(data), "format": "text", "max_length": seq, "val_fraction": 0.0},
        "method": methods[method],
        "train": {"batch_size": batch, "max_steps": STEPS, "lr": 1.0e-4, "precision": "fp32", "threads": 1,
                  "eval_before": False, "gradient_checkpointing": checkpointing, "save_every": 1000},
        "output_dir": str(out),
    }


def train(spec: dict[str, Any], directory: Path, env: dict[str, str]) -> dict[str, Any]:
    """One `tunelab train` process; its summary.json."""
    subprocess.run(["rm", "-rf", str(directory)], check=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    path = directory.with_suffix(".yaml")
    path.write_text(json.dumps(spec))  # JSON is YAML
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", str(path)], capture_output=True, text=True,
                            env={**os.environ, **env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, check=False)
    if result.returncode:
        raise RuntimeError(f"training failed ({spec['model']['name']}): {result.stderr[-2000:]}")
    summary = json.loads((directory / "summary.json").read_text())
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    return summary


def planned(model: str, method: str, seq: int, batch: int, checkpointing: bool, runtime: int) -> Any:
    arch = architecture_from_config(load_config(model), model)
    return estimate(arch, Settings(method=method, seq=seq, batch=batch, checkpointing=checkpointing, precision="fp32",
                                   device="cpu", runtime_bytes=runtime))


def large_model_row() -> dict[str, Any]:
    arch = architecture_from_config(load_config(str(LARGE_CONFIG)), "llama-2-7b")
    settings = Settings(method="lora", seq=2048, batch=4, precision="bf16", checkpointing=True, adapter_rank=8,
                        adapter_targets=("q_proj", "v_proj"), adapter_dropout=0.05, device="gpu", fused_loss=False, runtime_bytes=0)
    result = estimate(arch, settings)
    step = max((m for m in result.moments if m.name != "setup"), key=lambda m: m.total)
    return {
        **PUBLISHED, "estimate_bytes": step.total, "estimate_moment": step.name,
        "estimate_components_bytes": step.components,
        "error_pct": round(100 * (step.total - PUBLISHED["peak_bytes"]) / PUBLISHED["peak_bytes"], 1),
        "planner_settings": ("tunelab plan --model examples/plan/llama-2-7b.json --method lora --lora-r 8 --lora-targets q_proj,v_proj "
                             "--seq 2048 --batch 4 --precision bf16 --checkpointing --device gpu --loss logits --runtime-overhead 0"),
        "compared": ("the largest step moment (setup excluded: torchtune loads bf16 weights directly, tunelab loads fp32); "
                     "runtime 0 (torch's allocator statistics do not count the CUDA context)"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-default-malloc", action="store_true", help="skip the rows measured with glibc's default malloc")
    parser.add_argument("--only", default=None, help="run only rows whose label contains this text")
    args = parser.parse_args()
    data = OUT / "long_text.jsonl"
    make_data(data)
    runtime = measure_cpu_runtime(LIVE_MALLOC)
    runtime_default = measure_cpu_runtime()
    print(f"runtime overhead (measured): {runtime / MiB:,.0f} MiB; with glibc's default malloc {runtime_default / MiB:,.0f} MiB", flush=True)
    rows = []
    for label, model, method, seq, batch, checkpointing, default_too in ROWS:
        if args.only and args.only not in label:
            continue
        runs = [("live", LIVE_MALLOC, runtime)] + ([("glibc default", {}, runtime_default)] if default_too and not args.no_default_malloc else [])
        for allocator, env, overhead in runs:
            directory = OUT / f"{label.replace(' ', '_').replace(',', '')}-{seq}x{batch}-{allocator.replace(' ', '_')}"
            summary = train(recipe(model, method, seq, batch, checkpointing, data, directory), directory, env)
            result = planned(model, method, seq, batch, checkpointing, overhead)
            measured = summary["peak_rss_bytes"]
            row = {
                "label": label, "model": model, "method": method, "seq": seq, "batch": batch, "checkpointing": checkpointing,
                "allocator": allocator, "estimate_bytes": result.total, "estimate_moment": result.peak.name,
                "estimate_components_bytes": result.components, "measured_bytes": measured,
                "error_pct": round(100 * (result.total - measured) / measured, 1),
                "optimizer_state_bytes": summary["optimizer_state_bytes"], "trainable_params": summary["trainable_params"],
                "tokens_per_step": batch * seq, "wall_s": summary["wall_s"], "cpu": summary["cpu"],
            }
            rows.append(row)
            print(f"{label} seq {seq} x {batch} [{allocator}]: estimate {result.total / MiB:,.0f} MiB, measured {measured / MiB:,.0f} MiB "
                  f"({row['error_pct']:+.1f}%), {summary['wall_s']} s", flush=True)
    large = large_model_row()
    table = ["| run | seq x batch | allocator | estimate MiB | measured MiB | error | peak moment |", "|---|---|---|---:|---:|---:|---|"]
    for row in rows:
        table.append(f"| {row['label']} | {row['seq']} x {row['batch']} | {row['allocator']} | {row['estimate_bytes'] / MiB:,.0f} | "
                     f"{row['measured_bytes'] / MiB:,.0f} | {row['error_pct']:+.1f}% | {row['estimate_moment']} |")
    table += ["", "| large model (published) | setting | estimate GB | published GB | error |", "|---|---|---:|---:|---:|",
              f"| Llama2-7B, torchtune README v0.2.0 | {large['setting']} | {large['estimate_bytes'] / 1e9:.2f} | "
              f"{large['peak_bytes'] / 1e9:.1f} | {large['error_pct']:+.1f}% |"]
    cpu = cpu_model_name()
    live = [r for r in rows if r["allocator"] == "live"]
    worst = max((abs(r["error_pct"]) for r in live), default=0.0)
    note = (f"`tunelab plan` against real `tunelab train` peaks on {cpu}, torch {__import__('torch').__version__}, one thread, fp32, "
            f"{STEPS} steps; runtime overhead measured {runtime / MiB:,.0f} MiB. Largest error with the live allocator: {worst:.1f}%.")
    write_results(REPO / "bench" / "results", "plan_accuracy",
                  {"cpu": cpu, "runtime_bytes": runtime, "runtime_default_malloc_bytes": runtime_default, "steps": STEPS,
                   "live_malloc_env": LIVE_MALLOC, "large_model": large}, rows, note, table)


if __name__ == "__main__":
    main()
