"""Meta-learning on real few-shot tasks: is a meta-learned starting point better after k steps?

Tasks: CLINC150 5-way intent tasks (examples/data/clinc/tasks, see make_clinc_tasks.py); the
held-out tasks' 50 intents never appear in meta-training. For each seed, three
starting points, all SmolLM2-135M with a LoRA adapter (r 16, all linear layers):

- ``base``: a fresh adapter (B = 0: the base model itself);
- ``multitask``: LoRA SFT (AdamW) on the 1,200 meta-training rows, with as many example
  forward+backward passes as the meta-learning run takes;
- ``reptile`` / ``fomaml``: ``objective: meta`` on the same rows (examples/meta_clinc.yaml).

Each is then adapted to every held-out task with ``tunelab adapt``'s recipe (plain SGD at the
meta run's inner_lr on the task's 10 support rows, k = 5 and 20 steps) and scored on the task's
20 test requests by choice likelihood (5 options). k = 0 is the starting point itself.

    .venv/bin/python bench/meta_learning.py --seeds 0 1 2           # results in bench/results/meta_learning.{json,md}

Finished runs under --work are reused, so an interrupted bench continues where it stopped; rows already
in bench/results/meta_learning.json (same tasks and lr) are kept, so seeds can be added one at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tunelab.bench.tables import SAME_ON_EVERY_CPU  # noqa: E402
from tunelab.evaluate.pipeline import run_eval  # noqa: E402
from tunelab.hardware import cpu_model_name  # noqa: E402
from tunelab.recipe import load_recipe  # noqa: E402
from tunelab.train.adapt import adaptation_recipe  # noqa: E402
from tunelab.train.run import run_training  # noqa: E402

TASKS = REPO / "examples" / "data" / "clinc" / "tasks" / "heldout"
META_RECIPE = REPO / "examples" / "meta_clinc.yaml"
LORA = "method.lora={r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}"
BATCH = 8


def eval_overrides(task: str) -> tuple[str, ...]:
    return ("eval.after_training=true", "eval.task=choice", f"eval.data={TASKS / task}_test.jsonl", "eval.prompt_template='{text}'",
            "eval.answer_field=label", "eval.metrics=[accuracy]", "eval.batch_size=8")


def passes_per_episode(meta: Any) -> int:
    """Example forward+backward passes one meta-learning episode takes (an optimizer step takes grad_accum episodes)."""
    return meta.inner_steps * meta.support + (meta.query if meta.algorithm == "fomaml" else 0)


def train_start(kind: str, seed: int, work: Path) -> tuple[str, float]:
    """The starting point ``kind`` for ``seed`` (a run directory, or the base alias) and its training seconds."""
    if kind == "base":
        return "smollm2-135m", 0.0
    out = work / f"seed{seed}" / kind
    if not (out / "summary.json").exists():
        meta = load_recipe(META_RECIPE)
        overrides = [f"seed={seed}", f"output_dir={out}", *SAME_ON_EVERY_CPU]
        if kind == "multitask":  # the same rows, plain SFT, as many example passes as the meta run
            passes = meta.train.max_steps * meta.train.grad_accum * passes_per_episode(meta.objective)
            overrides += ["objective=null", "data.task_column=null", f"train.max_steps={math.ceil(passes / BATCH)}",
                          f"train.batch_size={BATCH}", "train.grad_accum=1"]
        else:
            overrides.append(f"objective.algorithm={kind}")
        run_training(load_recipe(META_RECIPE, overrides), show_progress=False)
    return str(out), json.loads((out / "summary.json").read_text())["seconds"]


def accuracy_at_start(start: str, task: str, seed: int, work: Path) -> float:
    """k = 0: the starting point scored on the task as it is."""
    out = work / f"seed{seed}" / "k0" / f"{Path(start).name}-{task}"
    report = out / "eval.json"
    if not report.exists():
        overrides = {"task": "choice", "data": str(TASKS / f"{task}_test.jsonl"), "prompt_template": "{text}", "answer_field": "label",
                     "metrics": ["accuracy"]}
        run_eval(None, overrides, start if start == "smollm2-135m" else None, [] if start == "smollm2-135m" else [start], out)
    return json.loads(report.read_text())["systems"][-1]["scores"]["accuracy"]


def adapted_accuracy(start: str, kind: str, task: str, steps: int, lr: float, seed: int, work: Path) -> tuple[float, float]:
    out = work / f"seed{seed}" / kind / "adapted" / f"{task}-k{steps}"
    if not (out / "summary.json").exists():
        overrides = (*eval_overrides(task), f"seed={seed}", *SAME_ON_EVERY_CPU, *((LORA,) if kind == "base" else ()))
        recipe = adaptation_recipe(start, str(TASKS / f"{task}_support.jsonl"), steps, lr=lr, output_dir=str(out), overrides=overrides)
        run_training(recipe, show_progress=False)
    systems = json.loads((out / "eval" / "eval.json").read_text())["systems"]
    return systems[-1]["scores"]["accuracy"], json.loads((out / "summary.json").read_text())["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--starts", nargs="+", default=["base", "multitask", "reptile", "fomaml"])
    parser.add_argument("--tasks", type=int, default=4, help="Held-out tasks used (of 10).")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--work", type=Path, default=REPO / "bench-results" / "meta")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    lr = load_recipe(META_RECIPE).objective.inner_lr
    tasks = sorted(p.name.removesuffix("_support.jsonl") for p in TASKS.glob("*_support.jsonl"))[: args.tasks]
    rows = earlier_rows(args.out / "meta_learning.json", tasks, lr)
    began = time.time()
    for seed in args.seeds:
        for kind in args.starts:
            if all(all(f"k{s}" in rows.get((seed, kind, task), {}) for s in args.steps) for task in tasks):
                continue  # measured by an earlier invocation (its rows are kept in bench/results)
            start, train_seconds = train_start(kind, seed, args.work)
            for task in tasks:
                row = {**rows.get((seed, kind, task), {}), "seed": seed, "start": kind, "task": task, "train_seconds": train_seconds,
                       "cpu": cpu_model_name(), "k0": accuracy_at_start(start, task, seed, args.work)}
                for steps in args.steps:
                    row[f"k{steps}"], row[f"k{steps}_seconds"] = adapted_accuracy(start, kind, task, steps, lr, seed, args.work)
                rows[(seed, kind, task)] = row
                print(json.dumps(row), flush=True)
            write_results(list(rows.values()), args, tasks, lr, time.time() - began)


def earlier_rows(path: Path, tasks: list[str], lr: float) -> dict[tuple[int, str, str], dict[str, Any]]:
    """Rows an earlier invocation measured on the same held-out tasks at the same adaptation lr
    (so seeds can be added one session at a time); a different protocol starts over."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("tasks") != tasks or saved.get("inner_lr") != lr:
        return {}
    return {(r["seed"], r["start"], r["task"]): r for r in saved["rows"]}


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace, tasks: list[str], lr: float, seconds: float) -> None:
    """The table over every seed measured so far: a cell's seeds are those with every task scored at that k."""
    ks = ["k0", *(f"k{s}" for s in args.steps)]
    table = ["| start | " + " | ".join(f"{k} ({k[1:]} steps)" for k in ks) + " | training s |", "|---|" + "---|" * (len(ks) + 1)]
    summary: dict[str, Any] = {}
    for kind in (kind for kind in args.starts if any(r["start"] == kind for r in rows)):
        mine = [r for r in rows if r["start"] == kind]
        summary[kind] = {}
        for k in ks:
            scored = {s: [r[k] for r in mine if r["seed"] == s and k in r] for s in sorted({r["seed"] for r in mine})}
            per_seed = [statistics.mean(v) for v in scored.values() if len(v) == len(tasks)]
            if per_seed:
                summary[kind][k] = {"mean": statistics.mean(per_seed), "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
                                    "seeds": [s for s, v in scored.items() if len(v) == len(tasks)]}
        cells = [f"{c['mean']:.3f} ± {c['std']:.3f} ({len(c['seeds'])})" if (c := summary[kind].get(k)) else "–" for k in ks]
        table.append(f"| {kind} | " + " | ".join(cells) + f" | {statistics.mean(r['train_seconds'] for r in mine):.0f} |")
    meta = {"cpu": cpu_model_name(), "seeds": sorted({r["seed"] for r in rows}), "tasks": tasks, "inner_lr": lr, "bench_seconds": round(seconds)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "meta_learning.json").write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    note = (f"Held-out CLINC150 5-way tasks ({len(tasks)}: {', '.join(tasks)}; 20 test requests each), accuracy by choice likelihood; "
            f"mean ± std over seeds (how many in brackets) of the per-seed mean over tasks. Adaptation: SGD lr {lr} on 10 support rows. "
            f"CPU: {', '.join(sorted({r.get('cpu', 'AMD EPYC') for r in rows}))}; every run trains in fp32.")
    (args.out / "meta_learning.md").write_text(note + "\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
