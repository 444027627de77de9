"""Merging two task adapters, ensembles and soups on real data, each against its members.

    .venv/bin/python bench/merging.py tasks [--seeds 0 1 2]       # TIES/DARE of two LoRA task adapters
    .venv/bin/python bench/merging.py ensemble [--seeds 0 1 2]    # 3 LoRA runs vs their ensemble
    .venv/bin/python bench/merging.py soup [--seeds 0 1 2]        # greedy soup vs the best member

tasks: per seed, LoRA (r=16, all linear layers) on SmolLM2-135M-Instruct for Rotten Tomatoes
sentiment (examples/quickstart.yaml, 56 steps) and for Reuters newswire topics (earnings,
acquisition, oil, trade: examples/topic_finetune.yaml, 34 steps); the two adapters are merged
(average, task arithmetic, TIES, DARE-TIES) and every system is scored on both tasks' balanced
held-out sets by answer likelihood (200 reviews, 160 articles).

ensemble / soup: all-MiniLM-L6-v2 with a classification head on 1,000 Rotten Tomatoes snippets
(bench-results/rt1k, made as bench/optimizers.py says), 2 epochs. ensemble: three LoRA runs
(r=16, lr 5e-4) that differ only in seed, then their logit / probability averages and majority
vote, scored on the 500 test snippets. soup: three full fine-tunes from one initialisation (one
seed) at lr 3e-5, 5e-5 and 8e-5; the greedy soup is scored on 200 snippets of held-out movies
and everything is reported on the other 300. Results append to bench-results/merging.json (a
rerun skips finished rows); the markdown tables print at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tunelab.bench.tables import mean_std as ms

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-results"
RT1K = OUT / "rt1k"

BASE = "base model (0-shot)"
#: name -> merge CLI arguments (after the two adapters).
TASK_MERGES = {
    "average (linear 0.5/0.5)": ["--method", "linear"],
    "task arithmetic (1, 1)": ["--method", "task_arithmetic"],
    "TIES (density 0.2)": ["--method", "ties", "--density", "0.2"],
    "DARE-TIES (density 0.5)": ["--method", "dare_ties", "--density", "0.5"],
}
TASK_EVALS = {
    "sentiment": {"data": str(ROOT / "examples/data/rt_cls_test.jsonl"), "task": "choice", "choices": ["negative", "positive"],
                  "prompt_template": "Review: {text}\nIs this review positive or negative?", "answer_field": "label",
                  "metrics": ["accuracy"], "batch_size": 8},
    "topic": {"data": str(ROOT / "examples/data/reuters/reuters_topic_test.jsonl"), "task": "choice",
              "choices": ["earnings", "acquisition", "oil", "trade"], "answer_field": "label",
              "prompt_template": "Article: {text}\nIs this article about earnings, acquisition, oil or trade?",
              "metrics": ["accuracy"], "batch_size": 8},
}


def tunelab(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tunelab.cli", *args], check=True, cwd=ROOT)


def results() -> dict[str, Any]:
    path = OUT / "merging.json"
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return row["part"], row["seed"], row.get("system")


def save(data: dict[str, Any]) -> None:
    """Write our rows together with any another part (another process) wrote meanwhile."""
    from tunelab.hardware import cpu_model_name

    on_disk = results()["rows"]
    ours = {_key(r) for r in data["rows"]}
    data["rows"] = [r for r in on_disk if _key(r) not in ours] + data["rows"]
    data["cpu"] = cpu_model_name()
    tmp = OUT / "merging.json.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(OUT / "merging.json")


def scores(system: str, overrides: dict[str, Any]) -> float:
    """Accuracy of one run (or the base model, ``system`` a model name) on one held-out set."""
    from tunelab.evaluate.runner import evaluate
    from tunelab.evaluate.setup import resolve_setup

    setup = resolve_setup(None, overrides)
    is_run = Path(system).exists()
    result = evaluate(setup, None if is_run else system, [system] if is_run else [], show_progress=False)[0]
    return result.scores["accuracy"]


def train(recipe: str, out: Path, seed: int, *overrides: str) -> Path:
    if not (out / "summary.json").exists():
        tunelab("train", recipe, f"output_dir={out}", f"seed={seed}", "train.threads=1", "eval.after_training=false", *overrides)
    return out


def bench_tasks(seed: int, data: dict[str, Any]) -> None:
    runs = OUT / "merge-runs"
    members = {"sentiment adapter": train("examples/quickstart.yaml", runs / f"sentiment-seed{seed}", seed),
               "topic adapter": train("examples/topic_finetune.yaml", runs / f"topic-seed{seed}", seed)}
    systems: dict[str, str] = {BASE: "smollm2-135m", **{k: str(v) for k, v in members.items()}}
    for name, args in TASK_MERGES.items():
        merged = runs / f"{name.split()[0].lower()}-seed{seed}"
        if not (merged / "merge.json").exists():
            tunelab("merge", str(members["sentiment adapter"]), str(members["topic adapter"]), *args, "--seed", str(seed), "--out", str(merged))
        systems[name] = str(merged)
    for name, system in systems.items():
        if any(r["part"] == "tasks" and r["seed"] == seed and r["system"] == name for r in data["rows"]):
            continue
        # The base model's scores do not depend on the seed: score it once.
        earlier = next((r for r in data["rows"] if r["part"] == "tasks" and r["system"] == name == BASE), None)
        measured = {task: earlier[task] if earlier else scores(system, cfg) for task, cfg in TASK_EVALS.items()}
        row = {"part": "tasks", "seed": seed, "system": name, **measured}
        data["rows"].append(row)
        save(data)
        print(row, flush=True)


def minilm_recipe(out: Path, seed: int, method: dict[str, Any], lr: float, train_file: Path) -> dict[str, Any]:
    return {"model": {"name": "minilm-l6"}, "data": {"train": str(train_file), "validation": str(RT1K / "rt_cls_test.jsonl"), "max_length": 64},
            "method": {"head": {"type": "classification"}, **method}, "seed": seed, "output_dir": str(out),
            "train": {"epochs": 2, "batch_size": 16, "schedule": "linear", "warmup_ratio": 0.1, "precision": "fp32", "threads": 1,
                      "eval_before": False, "lr": lr}}


def train_minilm(out: Path, seed: int, method: dict[str, Any], lr: float) -> str:
    from tunelab.recipe import recipe_from_dict
    from tunelab.train.run import run_training

    if not (out / "summary.json").exists():
        run_training(recipe_from_dict(minilm_recipe(out, seed, method, lr, RT1K / "rt_cls_train.jsonl")), show_progress=False)
    return str(out)


def classification(data_file: Path) -> dict[str, Any]:
    return {"data": str(data_file), "task": "classification", "answer_field": "label", "metrics": ["accuracy"], "batch_size": 32}


def bench_ensemble(seed: int, data: dict[str, Any]) -> None:
    """Members: three LoRA runs whose seeds are 3*seed, 3*seed+1, 3*seed+2 (disjoint across repeats)."""
    from tunelab.evaluate.ensemble import ensemble
    from tunelab.evaluate.runner import evaluate
    from tunelab.evaluate.setup import resolve_setup

    if any(r["part"] == "ensemble" and r["seed"] == seed for r in data["rows"]):
        return
    lora = {"lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"}}
    members = [train_minilm(OUT / "ensemble-runs" / f"lora-seed{3 * seed + i}", 3 * seed + i, lora, 5e-4) for i in range(3)]
    setup = resolve_setup(None, classification(RT1K / "rt_cls_test.jsonl"))
    evaluated = evaluate(setup, None, members, show_progress=False)
    row = {"part": "ensemble", "seed": seed, "members": [r.scores["accuracy"] for r in evaluated]}
    for how in ("logits", "probs", "vote"):
        row[how] = ensemble(evaluated, how, setup.cfg).scores["accuracy"]
    data["rows"].append(row)
    save(data)
    print(row, flush=True)


def split_held_out() -> tuple[Path, Path]:
    """The rt1k test snippets (shuffled, from movies no training snippet comes from) split into
    the first 200 for choosing (greedy soup) and the other 300 for reporting."""
    val, test = OUT / "rt1k-soup-val.jsonl", OUT / "rt1k-soup-test.jsonl"
    if not test.exists():
        rows = [json.loads(line) for line in (RT1K / "rt_cls_test.jsonl").read_text().splitlines()]
        val.write_text("".join(json.dumps(r) + "\n" for r in rows[:200]))
        test.write_text("".join(json.dumps(r) + "\n" for r in rows[200:]))
    return val, test


def _soup_member_dir(lr: float, seed: int) -> Path:
    """bench/optimizers.py's AdamW run is this recipe at lr 5e-5 (same data, seed, schedule): reuse it."""
    same = OUT / "optimizer-runs" / f"adamw-seed{seed}"
    return same if lr == 5e-5 and (same / "summary.json").exists() else OUT / "soup-runs" / f"full-lr{lr:g}-seed{seed}"


def bench_soup(seed: int, data: dict[str, Any]) -> None:
    from tunelab.evaluate.runner import evaluate
    from tunelab.evaluate.setup import resolve_setup

    if any(r["part"] == "soup" and r["seed"] == seed for r in data["rows"]):
        return
    val, test = split_held_out()
    members = [train_minilm(_soup_member_dir(lr, seed), seed, {"freeze": {"base": False}}, lr) for lr in (3e-5, 5e-5, 8e-5)]
    soups = {}
    for method in ("uniform", "greedy"):
        out = OUT / "soup-runs" / f"{method}-seed{seed}"
        if not (out / "merge.json").exists():
            extra = ["--data", str(val), "--task", "classification", "--answer-field", "label"] if method == "greedy" else []
            tunelab("merge", *members, "--method", method, "--out", str(out), *extra)
        soups[method] = str(out)
    setup = resolve_setup(None, classification(test))
    evaluated = evaluate(setup, None, [*members, *soups.values()], show_progress=False)
    accuracy = [r.scores["accuracy"] for r in evaluated]
    val_scores = [evaluate(resolve_setup(None, classification(val)), None, [m], show_progress=False)[0].scores["accuracy"] for m in members]
    chosen = json.loads((Path(soups["greedy"]) / "merge.json").read_text())["chosen"]
    row = {"part": "soup", "seed": seed, "members": accuracy[:3], "members_val": val_scores, "uniform": accuracy[3], "greedy": accuracy[4],
           "greedy_kept": len(chosen), "best_on_val": accuracy[val_scores.index(max(val_scores))]}
    data["rows"].append(row)
    save(data)
    print(row, flush=True)


def tables(data: dict[str, Any]) -> str:
    rows, out = data["rows"], [f"CPU: {data.get('cpu', '?')}"]
    tasks = [r for r in rows if r["part"] == "tasks"]
    if tasks:
        seeds = len({r["seed"] for r in tasks if r["system"] != BASE})  # the base row is copied into every seed started
        out += ["", f"| system ({seeds} seeds) | sentiment accuracy | topic accuracy |", "|---|---|---|"]
        order = [BASE, "sentiment adapter", "topic adapter", *TASK_MERGES]
        for name in sorted(dict.fromkeys(r["system"] for r in tasks), key=lambda n: order.index(n) if n in order else len(order)):
            mine = [r for r in tasks if r["system"] == name]
            out.append(f"| {name} | {ms([r['sentiment'] for r in mine])} | {ms([r['topic'] for r in mine])} |")
    ens = [r for r in rows if r["part"] == "ensemble"]
    if ens:
        out += ["", f"| system ({len(ens)} repeats of 3 runs) | accuracy |", "|---|---|",
                f"| a member (mean of all) | {ms([m for r in ens for m in r['members']])} |",
                f"| the best member | {ms([max(r['members']) for r in ens])} |"]
        out += [f"| ensemble: {how} | {ms([r[how] for r in ens])} |" for how in ("logits", "probs", "vote")]
    soup = [r for r in rows if r["part"] == "soup"]
    if soup:
        out += ["", f"| system ({len(soup)} seeds, 3 learning rates each) | accuracy (300 test snippets) |", "|---|---|",
                f"| the member best on the 200 validation snippets | {ms([r['best_on_val'] for r in soup])} |",
                f"| the best member on test (oracle) | {ms([max(r['members']) for r in soup])} |",
                f"| uniform soup | {ms([r['uniform'] for r in soup])} |",
                f"| greedy soup (kept {', '.join(str(r['greedy_kept']) for r in soup)} of 3) | {ms([r['greedy'] for r in soup])} |"]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["tasks", "ensemble", "soup", "table"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    data = results()
    part = {"tasks": bench_tasks, "ensemble": bench_ensemble, "soup": bench_soup}.get(args.part)
    for seed in args.seeds if part else []:
        part(seed, data)
    print(tables(data))


if __name__ == "__main__":
    main()
