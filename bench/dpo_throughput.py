"""DPO training throughput: tunelab's ``dpo`` objective vs TRL's ``DPOTrainer`` + PEFT, same LoRA run.

    .venv/bin/python bench/dpo_throughput.py                 # SmolLM2-135M, 8 steps of 8 pairs each side
    .venv/bin/python bench/dpo_throughput.py --steps 3 --model tiny-llama-20m   # smoke test

Both sides train LoRA r=16 (alpha 32, all linear layers, no dropout) on the same pairs
(the first 8 × steps of examples/data/preference/factual_pairs_train.jsonl, each side in its own
seeded order), batch 8 pairs, lr 5e-5 constant,
beta 0.1, fp32, the same thread count, the reference being the model with its adapter off.
Each side runs in its own process (peak RSS is the process's own); the first step (warm-up) is not
timed. It prints pairs/s for each side, the ratio, peak RSS, and both sides' losses
per step: with the same initial adapter (B = 0) both start at log 2, and the losses that follow
show the two trainers compute the same objective. Needs ``pip install trl==1.16.0`` (the
``bench`` extra). Results: bench/results/dpo_throughput_<model>.json, bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "examples" / "data" / "preference" / "factual_pairs_train.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def rows(n: int) -> list[dict]:
    return [json.loads(line) for line in PAIRS.read_text().splitlines()[:n]]


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side_tunelab(model: str, steps: int, threads: int, workdir: Path) -> dict:
    from tunelab.recipe import recipe_from_dict
    from tunelab.train.callbacks import Callback
    from tunelab.train.run import run_training

    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(8 * steps)))

    class Clock(Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, state) -> None:
            self.ends.append(time.perf_counter())

    clock = Clock()
    recipe = recipe_from_dict({
        "model": {"name": model},
        "data": {"train": str(data), "val_fraction": 0.0, "max_length": 256, "dedup": False},
        "method": {"lora": {**LORA, "target_modules": "all-linear"}},
        "objective": {"name": "dpo", "beta": 0.1},
        "train": {"max_steps": steps, "batch_size": 8, "lr": 5e-5, "schedule": "constant", "warmup_steps": 0,
                  "precision": "fp32", "threads": threads, "log_every": 1, "save_every": None,
                  "eval_before": False},
        "output_dir": str(workdir / "run"),
    }, name="dpo-bench")
    run_training(recipe, show_progress=False, callbacks=(clock,))
    records = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("type") == "train"]
    return {"step_ends": clock.ends, "losses": losses}


def side_trl(model: str, steps: int, threads: int, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tunelab.models import load_model

    loaded = load_model(model, "causal-lm")
    torch.set_num_threads(threads)
    pairs = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows(8 * steps)]

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    clock = Clock()
    args = DPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=8, max_steps=steps, learning_rate=5e-5,
        lr_scheduler_type="constant", warmup_steps=0, beta=0.1, max_length=256, logging_steps=1, report_to=[],
        use_cpu=True, bf16=False, save_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=loaded.model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=loaded.tokenizer,
                         peft_config=lora, callbacks=[clock])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_ends": clock.ends, "losses": losses}


def run_side(side: str, model: str, steps: int, threads: int, workdir: Path) -> dict:
    """One side in its own process (its peak RSS is its own)."""
    out = workdir / f"{side}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--side", side, "--model", model, "--steps", str(steps), "--threads", str(threads), "--workdir", str(workdir)]
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", choices=["tunelab", "trl"])
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if args.side:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = (side_tunelab if args.side == "tunelab" else side_trl)(args.model, args.steps, args.threads, args.workdir)
        report["peak_rss_mb"] = peak_rss_mb()
        (args.workdir / f"{args.side}.json").write_text(json.dumps(report))
        return

    import platform
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="dpo_bench_"))
    sides = {side: run_side(side, args.model, args.steps, args.threads, workdir) for side in ("trl", "tunelab")}
    timed_pairs = 8 * (args.steps - 1)
    for report in sides.values():
        ends = report["step_ends"]
        report["steady_seconds"] = ends[-1] - ends[0]
        report["pairs_per_s"] = timed_pairs / report["steady_seconds"]
    ratio = sides["tunelab"]["pairs_per_s"] / sides["trl"]["pairs_per_s"]
    memory = sides["tunelab"]["peak_rss_mb"] / sides["trl"]["peak_rss_mb"]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    result = {"model": args.model, "steps": args.steps, "threads": args.threads, "cpu": cpu, "pairs_per_step": 8,
              "speedup": ratio, "memory_ratio": memory, "sides": sides}
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / f"dpo_throughput_{args.model}.json").write_text(json.dumps(result, indent=1))
    for name, report in sides.items():
        losses = ", ".join(f"{x:.4f}" for x in report["losses"])
        print(f"{name:8s} {report['pairs_per_s']:.3f} pairs/s  peak RSS {report['peak_rss_mb']:.0f} MB  losses {losses}")
    print(f"dpo: speedup={ratio:.2f} mem_ratio={memory:.2f} ({cpu}, {args.threads} threads)")


if __name__ == "__main__":
    main()
