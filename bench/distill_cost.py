"""What distillation costs per training step: no teacher vs a live teacher vs cached teacher outputs.

    .venv/bin/python bench/distill_cost.py [--teacher RUN_DIR_OR_MODEL] [--rounds 5]

The student is the half-depth SmolLM2 of examples/distill.yaml (first 8 + last 7 of 30 blocks,
all weights but the embeddings trained), on 8 packed quickstart reviews (~550 tokens). One step
is the objective's forward and backward:

- ``causal_lm``: plain SFT, no teacher;
- ``kd_logits`` live: the teacher's forward on the same batch every step (full vocabulary);
- ``kd_logits`` cached: the teacher's top-64 logits read from the teacher cache, built once
  (its build time is reported separately: it is paid once per teacher and data, not per step);
- ``kd_attention``: the live teacher plus query/key/value relations of the last blocks;
- ``kd_on_policy`` with ``on_policy_fraction: 1``: every step the student samples its answers
  (up to 8 tokens) to the batch's prompts and the teacher scores them (a recipe's default 0.5
  pays this on half the steps and the live-teacher cost on the others).

Rounds alternate the modes so machine load hits them alike; the median CPU seconds per step and
the ratios to plain SFT are printed and written to bench-results/distill_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m", help="model or run directory (default: the packaged SmolLM2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()

    os.environ.setdefault("TUNELAB_CACHE", tempfile.mkdtemp(prefix="tunelab-bench-cache-"))
    import torch

    from tunelab.data import collate_packed
    from tunelab.hardware import cpu_model_name
    from tunelab.recipe import recipe_from_dict
    from tunelab.train.prepare import prepare

    def prepared(objective: dict) -> tuple[object, float]:
        recipe = recipe_from_dict({
            "model": {"name": args.teacher},
            "data": {"train": str(ROOT / "examples/data/rt_sentiment_train.jsonl"), "max_length": 256},
            "method": {"student": {"keep": "ends"}, "freeze": {"embeddings": True}},
            "objective": objective,
            "train": {"precision": "fp32"},
        })
        start = time.perf_counter()
        result = prepare(recipe)
        return result, time.perf_counter() - start

    modes = {
        "no teacher (causal_lm)": prepared({"name": "causal_lm"})[0],
        "live teacher (kd_logits)": prepared({"name": "kd_logits"})[0],
    }
    uncached_prepare = prepared({"name": "kd_logits", "top_k": 64})[1]
    cached, cached_prepare = prepared({"name": "kd_logits", "top_k": 64, "cache": True})
    modes["cached teacher top-64 (kd_logits, cache)"] = cached
    modes["attention transfer (kd_attention)"] = prepared({"name": "kd_attention"})[0]
    modes["on-policy every step (kd_on_policy)"] = prepared({"name": "kd_on_policy", "on_policy_fraction": 1.0, "max_new_tokens": 8})[0]
    cache_build_seconds = cached_prepare - uncached_prepare
    batch = collate_packed(next(iter(modes.values())).data.train[:8])  # type: ignore[attr-defined]

    def step(p: Any) -> float:
        model = p.model.train()
        model.zero_grad(set_to_none=True)
        start = time.process_time()
        loss, _ = p.objective(model, batch)
        (loss / p.objective.units(batch)).backward()
        return time.process_time() - start

    for p in modes.values():
        step(p)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, p in modes.items():
            times[name].append(step(p))
    base = statistics.median(times["no teacher (causal_lm)"])
    rows = {name: {"cpu_seconds_per_step": statistics.median(t), "ratio_to_no_teacher": statistics.median(t) / base} for name, t in times.items()}
    result = {
        "cpu": cpu_model_name(), "threads": torch.get_num_threads(), "tokens_per_step": int(batch["input_ids"].numel()),
        "teacher": args.teacher, "rounds": args.rounds, "steps": rows,
        "cache_build_seconds_450_examples": round(cache_build_seconds, 1),
    }
    print(f"distillation cost per step on {result['cpu']} ({result['threads']} threads, {result['tokens_per_step']} tokens):")
    for name, row in rows.items():
        print(f"  {name:<42} {row['cpu_seconds_per_step']:.2f} CPU s/step   {row['ratio_to_no_teacher']:.2f}x")
    print(f"  teacher cache, built once for 450 examples: {cache_build_seconds:.1f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_cost.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
