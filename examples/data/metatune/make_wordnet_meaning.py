"""Build ``wordnet_meaning_test.jsonl``, a held-out task type for meta-tuning (run once; committed).

Each row of ``../wordnet/wordnet_pairs_test.jsonl`` (WordNet 3.0 synonym sets, each with its own
definition and the definition of another sense of one of its words; see ../wordnet/SOURCE.md)
becomes a two-way multiple-choice item: which definition fits the words? The options' order is
drawn with seed 0, so the right one is first about half the time.

    python examples/data/metatune/make_wordnet_meaning.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    rng = random.Random(0)
    rows = []
    for line in (HERE.parent / "wordnet" / "wordnet_pairs_test.jsonl").read_text().splitlines():
        pair = json.loads(line)
        choices = [pair["positive"], pair["negative"]]
        rng.shuffle(choices)
        rows.append({"prompt": f"Words: {pair['anchor']}\nWhich definition fits these words?", "choices": choices, "answer": pair["positive"]})
    (HERE / "wordnet_meaning_test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} items")


if __name__ == "__main__":
    main()
