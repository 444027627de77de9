"""Build the WordNet definition-retrieval pairs shipped in ``examples/data/wordnet/``.

Each row: ``anchor`` = a synset's synonyms ("car, auto, automobile, machine, motorcar"),
``positive`` = its gloss, ``negative`` = the gloss of another sense of one of those words (a hard
negative: same word, different meaning). Synsets are split between train and test, so no test
definition is seen in training. Run from the repository root:

    .venv/bin/python examples/data/make_wordnet_pairs.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunelab.evaluate.wordnet import load_wordnet

OUT = Path(__file__).parent / "wordnet"
TRAIN, TEST = 800, 200


def rows(seed: int = 0) -> list[dict[str, str]]:
    wordnet = load_wordnet()
    candidates = []
    for synset in wordnet.all_synsets():
        lemmas = [lemma.name().replace("_", " ") for lemma in synset.lemmas()]
        if len(lemmas) < 2 or synset.pos() not in "nv":
            continue
        others = [s for lemma in synset.lemmas() for s in wordnet.synsets(lemma.name(), synset.pos()) if s != synset]
        if others:
            candidates.append((synset, lemmas, others))
    rng = random.Random(seed)
    chosen = rng.sample(candidates, TRAIN + TEST)
    return [
        {"anchor": ", ".join(lemmas), "positive": synset.definition(), "negative": rng.choice(others).definition()}
        for synset, lemmas, others in chosen
    ]


def main() -> None:
    data = rows()
    OUT.mkdir(exist_ok=True)
    for name, part in (("wordnet_pairs_train.jsonl", data[:TRAIN]), ("wordnet_pairs_test.jsonl", data[TRAIN:])):
        (OUT / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))


if __name__ == "__main__":
    main()
