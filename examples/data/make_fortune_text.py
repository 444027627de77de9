"""Split the shipped fortune cookies into raw-text rows for continued pretraining.

``heldout/fortunes.txt`` (Debian ``fortunes``, BSD; see ``heldout/SOURCE.md``) -> one ``{"text"}``
row per cookie in ``fortunes_text/`` (seeded shuffle; the last 150 cookies are the test split).
Run from the repository root: ``.venv/bin/python examples/data/make_fortune_text.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
TEST = 150


def main() -> None:
    cookies = [c.strip() for c in (HERE / "heldout" / "fortunes.txt").read_text().split("\n%\n") if c.strip().strip("%")]
    random.Random(0).shuffle(cookies)
    out = HERE / "fortunes_text"
    out.mkdir(exist_ok=True)
    for name, part in (("train.jsonl", cookies[:-TEST]), ("test.jsonl", cookies[-TEST:])):
        (out / name).write_text("".join(json.dumps({"text": c}, ensure_ascii=False) + "\n" for c in part))


if __name__ == "__main__":
    main()
