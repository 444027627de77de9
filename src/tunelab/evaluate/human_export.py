"""``tunelab human export``: a self-contained, blinded side-by-side review page.

Raters see each prompt with the outputs of 2+ systems labelled A, B, ... in an order shuffled per
item (seeded), so neither position nor system name can sway them. The page holds no key: the
letter-to-system mapping goes to a separate ``<page>.key.json`` that ``tunelab human import``
reads, so a rater who opens the page source still cannot unblind it. The page needs no network:
its script, styles and data are inline, and ratings are saved by the browser as a download.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunelab import atomic
from tunelab.data.bad_rows import BadRows
from tunelab.data.readers import read_rows
from tunelab.errors import UserError

PAGE_TEMPLATE = Path(__file__).with_name("human_page.html")
OUTPUT_FIELDS = ("output", "prediction", "text")


def key_path(page: Path) -> Path:
    """Where the unblinding key of ``page`` lives."""
    return page.with_name(page.stem + ".key.json")


def _read_system(path: Path) -> list[tuple[str, str]]:
    """``(prompt, output)`` per record of a predictions JSONL (as written by ``tunelab eval``)."""
    pairs = []
    for row in read_rows(path, BadRows("error"), "the predictions file"):
        output = next((row.fields[f] for f in OUTPUT_FIELDS if f in row.fields), None)
        if "prompt" not in row.fields or output is None:
            raise UserError(
                f"a review row needs 'prompt' and one of {', '.join(OUTPUT_FIELDS)}",
                where=row.where,
                hint="use the predictions-*.jsonl that `tunelab eval --task generation` writes",
            )
        pairs.append((str(row.fields["prompt"]), str(output)))
    return pairs


def export_review(predictions: Sequence[str | Path], out: str | Path, names: Sequence[str] = (), seed: int = 0) -> Path:
    """Write the review page ``out`` and its key file; returns the page's path."""
    paths = [Path(p) for p in predictions]
    if len(paths) < 2:
        raise UserError("a side-by-side review needs outputs from at least 2 systems", hint="pass --predictions twice or more")
    if len(paths) > len(string.ascii_uppercase):
        raise UserError(f"at most {len(string.ascii_uppercase)} systems fit on one page")
    names = list(names) or [p.stem.removeprefix("predictions-") for p in paths]
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise UserError("give one distinct --name per --predictions file")
    systems = [_read_system(p) for p in paths]
    if len({len(s) for s in systems}) > 1:
        raise UserError("the predictions files have different numbers of items: " + ", ".join(f"{n}={len(s)}" for n, s in zip(names, systems)))
    items, orders = [], []
    for i, rows in enumerate(zip(*systems)):
        prompts = {prompt for prompt, _ in rows}
        if len(prompts) > 1:
            raise UserError(f"item {i + 1} has different prompts in different files", hint="export predictions of the same items, in the same order")
        order = list(range(len(paths)))
        random.Random(f"{seed}/{i}").shuffle(order)
        items.append({"id": i, "prompt": prompts.pop(), "outputs": [rows[s][1] for s in order]})
        orders.append(order)
    payload: dict[str, Any] = {"letters": list(string.ascii_uppercase[: len(paths)]), "items": items}
    payload["page"] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(out)
    # "<" escaped so no output text can close the <script> element holding the data.
    embedded = json.dumps(payload, ensure_ascii=False).replace("<", "\\u003c")
    atomic.write_text(out, PAGE_TEMPLATE.read_text(encoding="utf-8").replace("__REVIEW_DATA__", embedded))
    key = {"page": payload["page"], "systems": names, "sources": [str(p) for p in paths], "seed": seed,
           "items": [{"id": i, "order": [names[s] for s in order]} for i, order in enumerate(orders)]}
    atomic.write_json(key_path(out), key)
    return out
