"""Sparse updates (``train.sparse_updates``) against dense AdamW at equal steps, over seeds.

Workload: full fine-tuning of all-MiniLM-L6-v2 with a classification head on Rotten Tomatoes
(examples/objectives/sentiment_head_minilm.yaml: 500 training reviews, 200 test reviews of other
movies, 2 epochs of batches of 16, lr 5e-5, fp32). MiniLM's untied word embedding is 11.7M of its
22.7M parameters, and a batch of 16 reviews uses a few hundred of its 30,522 rows: the case sparse
updates are for. Each (seed, mode) trains in its own process, the two modes alternating, so load
on the machine hits both alike. Reported: test accuracy and loss (mean ± std over seeds), mean
step time after 5 warm-up steps and peak RSS, with the sparse/dense ratio.

    .venv/bin/python bench/sparse_updates.py                 # 3 seeds, ~10 min on 2 cores
    .venv/bin/python bench/sparse_updates.py --seeds 0 1     # fewer seeds

Writes bench/results/sparse_updates.{json,md}; a rerun continues the seeds already measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tunelab.bench.distributed_runs import mean_step_seconds, train_records  # noqa: E402
from tunelab.bench.tables import SAME_ON_EVERY_CPU, mean_std, run_missing, write_results  # noqa: E402
from tunelab.hardware import cpu_model_name  # noqa: E402

RECIPE = REPO / "examples" / "objectives" / "sentiment_head_minilm.yaml"
RESULTS = REPO / "bench" / "results"
MODES = {"dense AdamW": "false", "sparse updates": "true"}
WARM = 5


def train(seed: int, mode: str) -> dict[str, Any]:
    """One run in its own process; what its summary and metrics say."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "tunelab.cli", "train", "--no-progress", str(RECIPE), f"output_dir={out}", f"seed={seed}",
                   f"train.sparse_updates={MODES[mode]}", *SAME_ON_EVERY_CPU]
        subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
        summary = json.loads((out / "summary.json").read_text())
        return {"seed": seed, "mode": mode, "accuracy": summary["eval_after"]["eval_accuracy"],
                "eval_loss": summary["eval_after"]["eval_loss"], "step_s": mean_step_seconds(train_records(out), WARM),
                "peak_rss_mb": summary["peak_rss_bytes"] / 2**20, "steps": summary["steps"], "cpu": summary["cpu"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    plan = [(seed, mode) for seed in args.seeds for mode in MODES]
    _, rows = run_missing(RESULTS / "sparse_updates.json", plan, lambda r: (r["seed"], r["mode"]), lambda item: train(*item),
                          {"workload": str(RECIPE.relative_to(REPO))},
                          lambda r: f"seed {r['seed']} {r['mode']}: accuracy {r['accuracy']:.3f}, {r['step_s']:.3f} s/step, {r['peak_rss_mb']:.0f} MB")
    rows = [r for r in rows if r["seed"] in args.seeds]
    by_mode = {mode: [r for r in rows if r["mode"] == mode] for mode in MODES}
    dense_step = statistics.mean(r["step_s"] for r in by_mode["dense AdamW"])
    dense_rss = statistics.mean(r["peak_rss_mb"] for r in by_mode["dense AdamW"])
    table = ["| mode | test accuracy | test loss | s/step | vs dense | peak RSS MB | vs dense |", "|---|---:|---:|---:|---:|---:|---:|"]
    for mode, runs in by_mode.items():
        step, rss = statistics.mean(r["step_s"] for r in runs), statistics.mean(r["peak_rss_mb"] for r in runs)
        table.append(f"| {mode} | {mean_std([r['accuracy'] for r in runs])} | {mean_std([r['eval_loss'] for r in runs])} | "
                     f"{step:.3f} | {step / dense_step:.2f}x | {rss:.0f} | {rss / dense_rss:.2f}x |")
    cpus = sorted({r["cpu"] for r in rows})
    note = (f"all-MiniLM-L6-v2 + classification head, full fine-tuning on Rotten Tomatoes ({RECIPE.relative_to(REPO)}, fp32), "
            f"{len(args.seeds)} seeds, {rows[0]['steps']} steps each; s/step after {WARM} warm-up steps; each run in its own process, "
            f"modes alternating. CPU: {', '.join(cpus) or cpu_model_name()}.")
    write_results(RESULTS, "sparse_updates", {"workload": str(RECIPE.relative_to(REPO))}, rows, note, table)


if __name__ == "__main__":
    main()
