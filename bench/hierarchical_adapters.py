"""Hierarchical adapters on real multi-task data: shared + family adapters vs one flat adapter vs
separate adapters per task, at the same steps, batch and adapter rank per forward pass.

Tasks: the ten CLINC150 domains (examples/data/clinc/domains, see make_clinc_domains.py), each
"name which of the domain's 15 intents this request is"; the answer is scored by choice likelihood
among the domain's 15 intent names on 300 held-out requests (2 per intent). SmolLM2-135M, LoRA on
every linear layer, 150 steps of 8 rows (one epoch of the 1,200 training rows), AdamW lr 1e-3:

- ``flat``: one adapter, r 16, trained on every batch;
- ``hierarchical``: examples/hierarchy_clinc.yaml: a shared adapter r 8 plus one r 8 adapter per
  family of domains (money, home life, on the move, conversation); each batch is one family's;
- ``per_task``: one r 16 adapter per domain, no shared adapter (``shared: false``, one domain per
  family); each batch is one domain's.

The hierarchical run is scored twice: each request with its domain's family stack (by name), and
with the router choosing the family from the request alone (its routing accuracy beside it).

    .venv/bin/python bench/hierarchical_adapters.py --seeds 0 1 2     # bench/results/hierarchical_adapters.{json,md}

Finished runs under --work are reused, so an interrupted bench continues where it stopped; rows already
in bench/results/hierarchical_adapters.json are kept, so seeds can be added one session at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tunelab.bench.tables import SAME_ON_EVERY_CPU, mean_std, write_results  # noqa: E402
from tunelab.evaluate.pipeline import run_eval  # noqa: E402
from tunelab.hardware import cpu_model_name  # noqa: E402
from tunelab.recipe import load_recipe  # noqa: E402
from tunelab.train.run import run_training  # noqa: E402

RECIPE = REPO / "examples" / "hierarchy_clinc.yaml"
DOMAINS = json.loads((REPO / "examples" / "data" / "clinc" / "domains.json").read_text())
WIDE_LORA = "method.lora={r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}"
PER_TASK = "method.hierarchy={shared: false, r: 16, alpha: 32, families: {" + ", ".join(f"{d}: [{d}]" for d in DOMAINS) + "}}"
VARIANTS = {
    "flat": (WIDE_LORA, "method.hierarchy=null"),
    "hierarchical": (),
    "per_task": (WIDE_LORA, PER_TASK),
}


def trained(variant: str, seed: int, work: Path) -> Path:
    """The run of ``variant`` for ``seed`` (trained and evaluated by name unless already there)."""
    out = work / f"seed{seed}" / variant
    if not (out / "eval" / "eval.json").exists():
        recipe = load_recipe(RECIPE, [f"seed={seed}", f"output_dir={out}", *SAME_ON_EVERY_CPU, *VARIANTS[variant]])
        run_training(recipe, show_progress=False)
    return out


def routed(run: Path) -> dict[str, Any]:
    """The hierarchical run scored with the router choosing each request's family (no eval.task_field)."""
    recipe = load_recipe(RECIPE)
    out, data = run / "eval_routed", REPO / "examples" / str(recipe.eval.data)
    if not (out / "eval.json").exists():
        overrides = {"task": "choice", "data": str(data), "prompt_template": recipe.eval.prompt_template,
                     "answer_field": recipe.eval.answer_field, "metrics": ["accuracy"], "batch_size": recipe.eval.batch_size}
        run_eval(None, overrides, None, [str(run)], out)
    system = json.loads((out / "eval.json").read_text())["systems"][-1]
    records = [json.loads(line) for line in next(out.glob("predictions-*.jsonl")).read_text().splitlines()]
    items = [json.loads(line) for line in data.read_text().splitlines()]
    truth = {task: family for family, tasks in recipe.method.hierarchy.families.items() for task in tasks}  # type: ignore[union-attr]
    hits = sum(r["family"] == truth[item["task"]] for r, item in zip(records, items, strict=True))
    return {"accuracy": system["scores"]["accuracy"], "routing_accuracy": hits / len(records)}


def row_of(variant: str, seed: int, run: Path) -> dict[str, Any]:
    systems = json.loads((run / "eval" / "eval.json").read_text())["systems"]
    summary = json.loads((run / "summary.json").read_text())
    return {"seed": seed, "variant": variant, "accuracy": systems[-1]["scores"]["accuracy"], "base_accuracy": systems[0]["scores"]["accuracy"],
            "train_seconds": summary["seconds"], "trainable": summary.get("trainable_params"), "cpu": cpu_model_name()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=REPO / "bench-results" / "hierarchy")
    parser.add_argument("--finished-only", action="store_true", help="Report the runs already finished under --work; train nothing.")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    saved = args.out / "hierarchical_adapters.json"
    rows: list[dict[str, Any]] = json.loads(saved.read_text())["rows"] if saved.exists() else []
    began = time.time()
    for seed in args.seeds:
        for variant in args.variants:
            if any(r["seed"] == seed and r["variant"] == variant for r in rows):
                continue  # measured by an earlier invocation (rows are kept in bench/results, so seeds can be added later)
            if args.finished_only and not (args.work / f"seed{seed}" / variant / "eval" / "eval.json").exists():
                continue
            run = trained(variant, seed, args.work)
            rows.append(row_of(variant, seed, run))
            if variant == "hierarchical":
                rows.append({**rows[-1], "variant": "hierarchical, router picks the family", **routed(run)})
            print(json.dumps(rows[-1]), flush=True)
            report(rows, args, time.time() - began)
    report(rows, args, time.time() - began)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> None:
    table = ["| adapters | accuracy | routing accuracy | seeds | trainable params | training s |", "|---|---|---|---|---|---|"]
    base = [r["base_accuracy"] for r in rows if "base_accuracy" in r]
    table.append(f"| none (base SmolLM2, zero-shot) | {statistics.mean(base):.3f} | — | — | 0 | — |")
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        routing = mean_std([r["routing_accuracy"] for r in mine]) if "routing_accuracy" in mine[0] else "—"
        trainable = f"{mine[0]['trainable']:,}" if mine[0].get("trainable") else "—"
        seeds = ", ".join(str(r["seed"]) for r in mine)
        table.append(f"| {variant} | {mean_std([r['accuracy'] for r in mine])} | {routing} | {seeds} | {trainable} | {statistics.mean(r['train_seconds'] for r in mine):.0f} |")
    meta = {"cpu": cpu_model_name(), "seeds": sorted({r["seed"] for r in rows}), "bench_seconds": round(seconds)}
    note = (f"CLINC150, 10 domains as tasks, 300 held-out requests (2 per intent), accuracy by choice likelihood among the domain's 15 intents; "
            f"mean ± std over the seeds listed per row; 150 steps x 8 rows each, fp32. CPU: {', '.join(sorted({r.get('cpu', 'AMD EPYC') for r in rows}))}; training seconds were measured with other benchmarks sharing the 2 cores.")
    write_results(args.out, "hierarchical_adapters", meta, rows, note, table)


if __name__ == "__main__":
    main()
