"""Meta-tuning on real data: does instruction tuning on a mixture of task formats transfer
zero-shot to task types the mixture does not hold?

SmolLM2-135M, LoRA r 16 on every linear layer, 150 steps of 8 rows, AdamW lr 5e-4:

- ``mixture``: examples/meta_tuning.yaml -- sentiment (Rotten Tomatoes), news topic (Reuters),
  assistant intent (CLINC150) and emoji category (Unicode CLDR names), ~1,200 rows, each task its
  own prompt and label set (``data.mixture``);
- ``sentiment_only``: the same recipe on the sentiment file alone (500 rows): the same training
  cost on one format, to tell the mixture's effect from tuning's in general;
- ``base``: the model untouched.

Scored zero-shot by choice likelihood on three held-out task types -- yes/no reading
comprehension (BoolQ, 100 items), choosing which of two definitions fits a set of synonyms
(WordNet 3.0, the first 100 items), and choosing the faithful of two shortenings of a sentence
(the first 40 pairs: their long continuations make them the slowest to score) -- and on one type
in the mixture (sentiment, the first 100 Rotten Tomatoes test reviews) as a check.

    .venv/bin/python bench/meta_tuning.py --seeds 0 1 2      # bench/results/meta_tuning.{json,md}

Finished runs and evaluations under --work are reused, and the rows already in
bench/results/meta_tuning.json are kept, so seeds can be added one session at a time.
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

from tunelab.bench.tables import SAME_ON_EVERY_CPU, mean_std, run_missing, write_results  # noqa: E402
from tunelab.evaluate.pipeline import run_eval  # noqa: E402
from tunelab.hardware import cpu_model_name  # noqa: E402
from tunelab.recipe import load_recipe  # noqa: E402
from tunelab.train.run import run_training  # noqa: E402

RECIPE = REPO / "examples" / "meta_tuning.yaml"
DATA = REPO / "examples" / "data"
BASE = "smollm2-135m"
SENTIMENT_ONLY = ('data.mixture=[{train: data/rt_cls_train.jsonl, task: sentiment, '
                  'prompt_template: "Review: {text}\\nIs this review positive or negative?", completion_template: "{label}"}]')
VARIANTS = {"mixture": (), "sentiment_only": (SENTIMENT_ONLY,)}
#: name -> (held out of the mixture?, eval settings)
EVALS: dict[str, tuple[bool, dict[str, Any]]] = {
    "yes/no reading comprehension (BoolQ)": (True, {
        "data": DATA / "eval" / "boolq-eval.jsonl", "prompt_template": "{passage}\nQuestion: {question}?\nAnswer yes or no.",
        "choices": ["no", "yes"], "answer_field": "answer", "max_examples": 100}),
    "which definition fits (WordNet)": (True, {
        "data": DATA / "metatune" / "wordnet_meaning_test.jsonl", "prompt_template": "{prompt}", "answer_field": "answer", "max_examples": 100}),
    "faithful shortening (pairs)": (True, {"data": DATA / "preference" / "factual_pairs_test.jsonl", "prompt_template": "{prompt}", "max_examples": 40}),
    "sentiment (in the mixture)": (False, {
        "data": DATA / "rt_cls_test.jsonl", "prompt_template": "Review: {text}\nIs this review positive or negative?",
        "choices": ["negative", "positive"], "answer_field": "label", "max_examples": 100}),
}


def trained(variant: str, seed: int, work: Path) -> tuple[Path, float]:
    out = work / f"seed{seed}" / variant
    if not (out / "summary.json").exists():
        run_training(load_recipe(RECIPE, [f"seed={seed}", f"output_dir={out}", *SAME_ON_EVERY_CPU, *VARIANTS[variant]]), show_progress=False)
    return out, json.loads((out / "summary.json").read_text())["seconds"]


def accuracy(system: str, name: str, out: Path) -> float:
    """``system`` (the base alias or a run directory) scored zero-shot on held-out task ``name``."""
    report = out / "eval.json"
    if not report.exists():
        settings = {**EVALS[name][1], "task": "choice", "metrics": ["accuracy"], "batch_size": 8}
        settings["data"] = str(settings["data"])
        run_eval(None, settings, system if system == BASE else None, [] if system == BASE else [system], out)
    return json.loads(report.read_text())["systems"][-1]["scores"]["accuracy"]


def majority(name: str) -> float:
    """What always giving the most common answer scores (shared options), or picking at random
    (each item its own options): the floor a zero-shot row must clear to mean anything."""
    settings = EVALS[name][1]
    rows = [json.loads(line) for line in Path(settings["data"]).read_text().splitlines()][: settings.get("max_examples")]
    if "choices" not in settings:
        return statistics.mean(1 / len(r.get("choices", [0, 0])) for r in rows)
    answers = [str(r[settings["answer_field"]]).lower() for r in rows]
    return max(answers.count(a) for a in set(answers)) / len(answers)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.split(" (")[0]).strip("_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=REPO / "bench-results" / "meta_tuning")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    began = time.time()
    plan = [("base", None), *((variant, seed) for seed in args.seeds for variant in VARIANTS)]
    _, rows = run_missing(args.out / "meta_tuning.json", plan, lambda r: (r["variant"], r["seed"]),
                          lambda item: measure(*item, args.work), {"cpu": cpu_model_name()}, json.dumps)
    report(rows, args, time.time() - began)


def measure(variant: str, seed: int | None, work: Path) -> dict[str, Any]:
    """One row: ``variant`` trained with ``seed`` (the base model untouched for ``base``), scored on every task type."""
    if variant == "base":
        return {"variant": variant, "seed": None, "train_seconds": 0.0, "cpu": cpu_model_name(),
                **{name: accuracy(BASE, name, work / "base" / slug(name)) for name in EVALS}}
    assert seed is not None
    run, seconds = trained(variant, seed, work)
    return {"variant": variant, "seed": seed, "train_seconds": seconds, "cpu": cpu_model_name(),
            **{name: accuracy(str(run), name, run / "heldout" / slug(name)) for name in EVALS}}


def report(rows: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> None:
    names = list(EVALS)
    table = ["| tuned on | " + " | ".join(f"{n}{'' if EVALS[n][0] else ' ✓'}" for n in names) + " | held-out mean | training s |",
             "|---|" + "---|" * (len(names) + 2)]
    table.append("| (majority answer / chance) | " + " | ".join(f"{majority(n):.3f}" for n in names)
                 + f" | {statistics.mean(majority(n) for n in names if EVALS[n][0]):.3f} | — |")
    for variant in ["base", *VARIANTS]:
        mine = [r for r in rows if r["variant"] == variant]
        held = [statistics.mean(r[n] for n in names if EVALS[n][0]) for r in mine]
        table.append(f"| {variant} | " + " | ".join(mean_std([r[n] for r in mine]) for n in names)
                     + f" | {mean_std(held)} | {statistics.mean(r['train_seconds'] for r in mine):.0f} |")
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    cpus = sorted({r.get("cpu", "AMD EPYC") for r in rows})
    meta = {"cpu": cpu_model_name(), "seeds": seeds, "bench_seconds": round(seconds)}
    note = (f"Zero-shot accuracy by choice likelihood (raw log-likelihood); ✓ marks the task type that is in the mixture, the others are held out. "
            f"Mean ± std over seeds {seeds} (base: one deterministic row). 150 steps x 8 rows, fp32. CPU: {', '.join(cpus)}.")
    write_results(args.out, "meta_tuning", meta, rows, note, table)


if __name__ == "__main__":
    main()
