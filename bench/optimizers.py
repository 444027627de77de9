"""Optimizers and weight averaging on real data at equal compute: each against AdamW, 3 seeds.

    python examples/data/make_rotten_tomatoes.py SOURCE.csv.bz2 --train-per-label 500 \\
        --test-per-label 250 --seed 1 --out bench-results/rt1k      # SOURCE: see examples/data/SOURCE.md
    .venv/bin/python bench/optimizers.py --data bench-results/rt1k [--seeds 0 1 2]

Workload: full fine-tuning of all-MiniLM-L6-v2 (22.7M parameters, all trainable) with a
classification head on 1,000 Rotten Tomatoes snippets, 2 epochs (124 steps of 16), linear decay
after 10% warmup, fp32, one thread; accuracy on 500 snippets of other movies. Every run has the
same data, steps and batches; only the optimizer (and its usual learning rate) or the averaging
callback changes. SWA and EMA runs report the averaged weights and, from the same run, the live
weights of the last step. Step time: training steps 2..N from metrics.jsonl (evaluation excluded),
as a ratio to AdamW with the same seed, measured in the same process one run after another; with
``--timing-rounds N`` also round-robin (one step of each config in turn, N rounds, medians), which
keeps the ratios fair when other work shares the machine.
Optimizer memory: the optimizer's state tensors after training (``summary.optimizer_state_bytes``).
Writes bench-results/optimizers.json after every run (a rerun skips finished runs) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from tunelab.bench.tables import mean_std, run_missing

#: name -> (train overrides, callbacks). Sign methods take 5x AdamW's lr (Lion paper: 3-10x
#: smaller); Adafactor's lr is relative to each weight's RMS (~0.04 here), so 1e-3 moves weights
#: about as far per step as AdamW's 5e-5.
CONFIGS: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "adamw": ({"optimizer": "adamw", "lr": 5e-5}, []),
    "adamw8bit": ({"optimizer": "adamw8bit", "lr": 5e-5}, []),
    "adafactor": ({"optimizer": "adafactor", "lr": 1e-3}, []),
    "lion": ({"optimizer": "lion", "lr": 1e-5}, []),
    "signum": ({"optimizer": "signum", "lr": 1e-5}, []),
    "signsgd": ({"optimizer": "signsgd", "lr": 1e-5}, []),
    "adamw+swa": ({"optimizer": "adamw", "lr": 5e-5}, [{"name": "swa", "start": 0.5, "every": 4, "lr": 2.5e-5}]),
    "adamw+ema": ({"optimizer": "adamw", "lr": 5e-5}, [{"name": "ema", "decay": 0.98}]),
}


def recipe(data: Path, out: Path, seed: int, train: dict[str, Any], callbacks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "model": {"name": "minilm-l6"},
        "data": {"train": str(data / "rt_cls_train.jsonl"), "validation": str(data / "rt_cls_test.jsonl"), "max_length": 64},
        "method": {"head": {"type": "classification"}, "freeze": {"base": False}},
        "train": {"epochs": 2, "batch_size": 16, "schedule": "linear", "warmup_ratio": 0.1, "precision": "fp32",
                  "threads": 1, "eval_before": False, **train},
        "callbacks": callbacks, "seed": seed, "output_dir": str(out),
    }


def step_seconds(run_dir: Path) -> float:
    """Mean seconds per training step over steps 2..N (the first step warms up; evaluation excluded)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    return (train[-1]["elapsed_s"] - train[0]["elapsed_s"]) / (train[-1]["step"] - train[0]["step"])


def run_one(data: Path, runs: Path, name: str, seed: int) -> dict[str, Any]:
    from tunelab.recipe import recipe_from_dict
    from tunelab.train.run import run_training

    train, callbacks = CONFIGS[name]
    out = runs / f"{name}-seed{seed}"
    summary = run_training(recipe_from_dict(recipe(data, out, seed, train, callbacks)), show_progress=False)
    scores = summary.eval_after or {}
    return {
        "config": name, "seed": seed, "accuracy": scores["eval_accuracy"], "f1_macro": scores.get("eval_f1_macro"),
        "raw_accuracy": scores.get("eval_raw_accuracy"), "step_s": step_seconds(out), "steps": summary.steps,
        "optimizer_state_bytes": summary.optimizer_state_bytes, "trainable_params": summary.trainable_params,
    }


def interleaved_step_times(data: Path, rounds: int) -> dict[str, float]:
    """Median seconds per optimizer step (forward, backward, clip, optimizer, averaging callback)
    for every config, measured round-robin: one step of each config in turn, so whatever else the
    machine does slows every config alike and the ratios stay fair."""
    import time

    import torch

    from tunelab.models import load_model
    from tunelab.train.callbacks import TrainState
    from tunelab.train.config import TrainConfig
    from tunelab.train.optim import build_optimizer
    from tunelab.train.weight_average import (
        EMAConfig,
        ExponentialMovingAverage,
        StochasticWeightAveraging,
        SWAConfig,
    )

    texts = [json.loads(line) for line in (data / "rt_cls_train.jsonl").read_text().splitlines()][:16]
    setups = {}
    for name, (train, callbacks) in CONFIGS.items():
        loaded = load_model("minilm-l6", "sequence-classification", num_labels=2)
        model = loaded.model.train()
        optimizer = build_optimizer(model, TrainConfig(**train))
        callback = None
        if callbacks:  # averaging from the first timed step on
            settings = {k: v for k, v in callbacks[0].items() if k != "name"} | {"start": 1}
            swa = callbacks[0]["name"] == "swa"
            callback = StochasticWeightAveraging(SWAConfig(**settings), train["lr"]) if swa else ExponentialMovingAverage(EMAConfig(**settings))
        batch = loaded.tokenizer([t["text"] for t in texts], padding=True, truncation=True, max_length=64, return_tensors="pt")
        labels = torch.tensor([int(t["label"] == "positive") for t in texts])
        state = TrainState(model, optimizer, Path("."), max_steps=rounds + 2)
        setups[name] = (model, optimizer, callback, batch, labels, state)
    times: dict[str, list[float]] = {name: [] for name in setups}
    torch.set_num_threads(1)
    for step in range(rounds + 1):
        for name, (model, optimizer, callback, batch, labels, state) in setups.items():
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step = step + 2
            if callback is not None:
                callback.on_step_end(state)
            if step:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}



def table(rows: list[dict[str, Any]], timing: dict[str, float] | None = None) -> str:
    by = {(r["config"], r["seed"]): r for r in rows}
    time_column = "step time vs AdamW (interleaved)" if timing else "step time vs AdamW (in the runs)"
    lines = [f"| optimizer / averaging | accuracy (mean ± std) | {time_column} | optimizer state | bytes / param |", "|---|---|---|---|---|"]
    for name in CONFIGS:
        mine = [r for r in rows if r["config"] == name]
        if not mine:
            continue
        ratios = [r["step_s"] / by[("adamw", r["seed"])]["step_s"] for r in mine if ("adamw", r["seed"]) in by]
        memory = mine[0]["optimizer_state_bytes"]
        ratio = f"{statistics.mean(ratios):.2f}x" if ratios else "-"
        if timing:
            ratio = f"{timing[name] / timing['adamw']:.2f}x"
        lines.append(f"| {name} | {mean_std([r['accuracy'] for r in mine])} | {ratio} | {memory / 2**20:.1f} MiB | "
                     f"{memory / mine[0]['trainable_params']:.2f} |")
        if mine[0]["raw_accuracy"] is not None:
            lines.append(f"| {name}: live weights of the last step | {mean_std([r['raw_accuracy'] for r in mine])} | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("bench-results/rt1k"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--timing-rounds", type=int, default=0, help="Also time every config round-robin for N steps (fairer ratios on a busy machine).")
    args = parser.parse_args()

    from tunelab.hardware import cpu_model_name

    results_path = args.out / "optimizers.json"
    # seed-major: every config of a seed runs close together in time
    saved, rows = run_missing(
        results_path, [(name, seed) for seed in args.seeds for name in args.configs], lambda r: (r["config"], r["seed"]),
        lambda item: run_one(args.data, args.out / "optimizer-runs", *item), {"cpu": cpu_model_name()},
        lambda r: f"{r['config']} seed {r['seed']}: accuracy {r['accuracy']:.3f}",
    )
    timing = saved.get("interleaved_step_s")
    if args.timing_rounds:
        timing = interleaved_step_times(args.data, args.timing_rounds)
        results_path.write_text(json.dumps({**saved, "cpu": cpu_model_name(), "rows": rows, "interleaved_step_s": timing}, indent=2) + "\n")
    print(f"CPU: {cpu_model_name()}, 1 thread, fp32")
    print(table(rows, timing))


if __name__ == "__main__":
    main()
