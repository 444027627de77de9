"""Build the small image+text data set: handwritten digits and emoji as 32x32 RGB PNGs.

    .venv/bin/python examples/data/images/make_images.py --seed 0 --digits 1000

Options: --seed 0, --test-fraction 0.2, --digits N (default: all 1797), --upscale bilinear|nearest.

Sources (both installed locally, nothing is downloaded):
- digits: scikit-learn's copy of the UCI Optical Recognition of Handwritten Digits test set
  (`sklearn.datasets.load_digits()`, 8x8 images with values 0..16), drawn as dark ink on white
  and upscaled bilinearly to 32x32;
- emoji: the fully-qualified emoji of /usr/share/unicode/emoji/emoji-test.txt (Debian
  unicode-data) rendered with /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf (Debian
  fonts-noto-color-emoji), without skin-tone variants, the "Component" group, and anything that
  renders blank, as more than one glyph, or exactly like another emoji (the shorter name stays).

Two tasks: "Which digit is written in this image?" -> "7" and "Which kind of emoji is this?" ->
one of smiley, person, animal, food, place, activity, object, symbol, flag. Within every digit
class and every emoji category, the images are ranked by a seeded SHA-256 of their file name and
the first `--test-fraction` of them are held out. Writes digits/NNNN.png, emoji/<codepoints>.png,
train.jsonl (chat rows, shuffled), test.jsonl (prompt/answer/task, shuffled), captions.jsonl (image/text,
train images only) next to this script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
SIZE = 32
FONT_SIZE = 109  # the only size at which the CBDT bitmap strikes load
DIGIT_PROMPT = "Which digit is written in this image?"
EMOJI_PROMPT = "Which kind of emoji is this?"
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CATEGORIES = {
    "Smileys & Emotion": "smiley",
    "People & Body": "person",
    "Animals & Nature": "animal",
    "Food & Drink": "food",
    "Travel & Places": "place",
    "Activities": "activity",
    "Objects": "object",
    "Symbols": "symbol",
    "Flags": "flag",
}
SKIN_TONES = set(range(0x1F3FB, 0x1F400))


def save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").save(path, format="PNG", optimize=True)


def digit_items(limit: int | None, upscale: str):
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.images) if limit is None else min(limit, len(digits.images))
    for index in range(n):
        pixels = 255.0 - digits.images[index] * 255.0 / 16.0
        small = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
        image = small.resize((SIZE, SIZE), Image.NEAREST if upscale == "nearest" else Image.BILINEAR)
        label = int(digits.target[index])
        yield {
            "image": f"digits/{index:04d}.png",
            "pil": image,
            "task": "digits",
            "group": str(label),
            "prompt": DIGIT_PROMPT,
            "answer": str(label),
            "caption": f"a handwritten digit {NUMBER_WORDS[label]}",
        }


def emoji_entries():
    """(code points, name, category) for every fully-qualified emoji outside the Component group."""
    group = None
    for line in EMOJI_TEST.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            continue
        if not line.strip() or line.startswith("#"):
            continue
        fields, _, comment = line.partition("#")
        codes, status = (part.strip() for part in fields.split(";"))
        if status != "fully-qualified" or group not in CATEGORIES:
            continue
        points = [int(code, 16) for code in codes.split()]
        if SKIN_TONES.intersection(points):
            continue
        name = comment.strip().split(" ", 2)[2]  # "<emoji> E1.0 grinning face"
        yield points, name, CATEGORIES[group]


def render_emoji(text: str, font: ImageFont.FreeTypeFont, one_glyph_width: int):
    """The emoji as a 32x32 image on white, or (None, reason) when it is blank or several glyphs."""
    left, top, right, bottom = font.getbbox(text)
    if right - left <= 0 or bottom - top <= 0:
        return None, "no glyph"
    if right - left > 1.25 * one_glyph_width:
        return None, f"{(right - left) / one_glyph_width:.1f} glyphs wide"
    canvas = Image.new("RGBA", (right + 20, bottom + 20), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((10, 10), text, font=font, embedded_color=True)
    alpha = np.asarray(canvas)[:, :, 3]
    if alpha.std() < 1.0:
        return None, "blank"
    box = canvas.getbbox()
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    white = Image.new("RGBA", square.size, (255, 255, 255, 255))
    flat = Image.alpha_composite(white, square).convert("RGB")
    if np.asarray(flat.convert("L")).std() < 1.0:
        return None, "blank"
    return flat.resize((SIZE, SIZE), Image.LANCZOS), None


def emoji_items(skipped: list):
    font = ImageFont.truetype(str(FONT), FONT_SIZE)
    one_glyph_width = font.getbbox("\U0001F600")[2] - font.getbbox("\U0001F600")[0]
    rendered = []
    for points, name, category in emoji_entries():
        stem = "-".join(f"{point:x}" for point in points)
        image, reason = render_emoji("".join(map(chr, points)), font, one_glyph_width)
        if image is None:
            skipped.append((stem, name, reason))
        else:
            rendered.append((stem, name, category, image))
    # Some emoji share one picture (the flags of Norway, Bouvet Island and Svalbard): keep the one
    # with the shortest name, so a picture never has two captions or sits in both train and test.
    keep: dict[bytes, tuple] = {}
    for entry in rendered:
        pixels = hashlib.sha256(entry[3].tobytes()).digest()
        if pixels not in keep or len(entry[1]) < len(keep[pixels][1]):
            keep[pixels] = entry
    kept = {id(entry) for entry in keep.values()}
    for entry in rendered:
        stem, name, category, image = entry
        if id(entry) not in kept:
            twin = keep[hashlib.sha256(image.tobytes()).digest()]
            skipped.append((stem, name, f"same image as {twin[0]} ({twin[1]})"))
            continue
        yield {
            "image": f"emoji/{stem}.png",
            "pil": image,
            "task": "emoji",
            "group": category,
            "prompt": EMOJI_PROMPT,
            "answer": category,
            "caption": f"{name}, {category}",
        }


def split(items: list[dict], seed: int, fraction: float) -> set[str]:
    """Image paths held out: per (task, group) the first round(fraction * n) by a seeded SHA-256."""
    by_group = defaultdict(list)
    for item in items:
        by_group[item["task"], item["group"]].append(item["image"])
    held_out = set()
    for paths in by_group.values():
        ranked = sorted(paths, key=lambda path: hashlib.sha256(f"{seed}:{path}".encode()).hexdigest())
        held_out.update(ranked[: round(fraction * len(ranked))])
    return held_out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--digits", type=int, default=None, help="use the first N digit images (default: all 1797)")
    parser.add_argument("--upscale", choices=["bilinear", "nearest"], default="bilinear",
                        help="how the 8x8 digits are enlarged (nearest gives ~4x smaller PNGs)")
    args = parser.parse_args()

    for folder in ("digits", "emoji"):  # start clean so a smaller rebuild leaves no stale images
        for old in (HERE / folder).glob("*.png"):
            old.unlink()

    skipped: list = []
    items = list(digit_items(args.digits, args.upscale)) + list(emoji_items(skipped))
    for item in items:
        save_png(item.pop("pil"), HERE / item["image"])
    held_out = split(items, args.seed, args.test_fraction)

    train = [item for item in items if item["image"] not in held_out]
    test = [item for item in items if item["image"] in held_out]
    random.Random(args.seed).shuffle(train)
    random.Random(args.seed + 1).shuffle(test)  # so the first N test rows (eval.max_examples) mix both tasks
    write_jsonl(HERE / "train.jsonl", [
        {"image": item["image"], "messages": [{"role": "user", "content": item["prompt"]},
                                              {"role": "assistant", "content": item["answer"]}]}
        for item in train])
    write_jsonl(HERE / "test.jsonl", [
        {"image": item["image"], "prompt": item["prompt"], "answer": item["answer"], "task": item["task"]}
        for item in test])
    write_jsonl(HERE / "captions.jsonl", [{"image": item["image"], "text": item["caption"]} for item in train])

    counts = Counter((item["task"], item["group"], "test" if item["image"] in held_out else "train") for item in items)
    for task, group in sorted({(task, group) for task, group, _ in counts}):
        print(f"{task:7s} {group:9s} train {counts[task, group, 'train']:4d}  test {counts[task, group, 'test']:4d}")
    print(f"train {len(train)}  test {len(test)}  captions {len(train)}")
    for stem, name, reason in skipped:
        print(f"skipped {stem} ({name}): {reason}")


if __name__ == "__main__":
    main()
