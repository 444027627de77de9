"""Data augmentation as a data stage: more training rows from the ones a user has, labels kept.

Easy Data Augmentation (Wei & Zou 2019): synonym replacement (WordNet, the copy tunelab ships),
random insertion of a synonym of another word, random swap of two words, random deletion; plus
masking (each word replaced by the tokenizer's mask or unknown token: token-level noise in the
word-dropout family). Each augmented copy of a row applies one operation, taking the enabled ones
in turn, as in the paper. Rates are fractions of the row's words: replace, insert and swap change
``max(1, round(rate * words))`` of them, delete and mask drop or mask each word with probability
``rate``.

Only the input side changes: a labelled text's text, a conversation's user turns. The label, the
assistant's answers and the validation/test rows are never touched (augmentation runs on the
training records after the split), so it is label-preserving by construction. Everything is
seeded by (run seed, row, copy); a copy identical to its row is not added, and with
``keep_if_label`` neither is one a classifier no longer gives its row's label (a filter for
operations that can flip meaning: a synonym of the wrong sense, a deleted "not"). The data report
counts the rows each operation added (and the filter dropped) and shows a few samples.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import Field, model_validator

from tunelab.config_base import Section
from tunelab.data.records import Record
from tunelab.data.rewrite import RewriteConfig, predict_labels, rewrite_texts
from tunelab.errors import UserError

OPERATIONS = ("synonym", "insert", "swap", "delete", "mask")

#: Function words EDA leaves alone when replacing or inserting synonyms (WordNet has senses for
#: some of them, "a" as a vitamin, "it" as information technology, that would change the meaning).
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who
    whom why will with would you your yours yourself yourselves""".split()
)


class AugmentConfig(Section):
    """Extra training rows made from each training row (never from validation or test rows)."""

    copies: int = Field(4, ge=1, description="Augmented copies made of each training row (each applies one operation, in turn).")
    synonym: float = Field(0.0, ge=0, le=1, description="Share of words replaced by a WordNet synonym (EDA's alpha_sr; the paper uses 0.1).")
    insert: float = Field(0.0, ge=0, le=1, description="Share of the words' count inserted: synonyms of other words at random places (alpha_ri).")
    swap: float = Field(0.0, ge=0, le=1, description="Share of the words' count of random swaps of two words (alpha_rs).")
    delete: float = Field(0.0, ge=0, le=1, description="Probability of deleting each word (EDA's p_rd; word dropout).")
    mask: float = Field(0.0, ge=0, le=1, description="Probability of replacing each word by the tokenizer's mask (or unknown) token.")
    rewrite: RewriteConfig | None = Field(None, description="Copies written by a model: a paraphrase, or back-translation through a chain of prompts.")
    keep_if_label: str | None = Field(
        None, description="A classifier (a run directory with a classification head) that must still give a copy its row's label for the copy to be kept."
    )

    @model_validator(mode="after")
    def _something_enabled(self) -> AugmentConfig:
        if not self.operations() and self.rewrite is None:
            raise ValueError("no augmentation is enabled: set a rate above 0 for one of " + ", ".join(OPERATIONS) + ", or a rewrite model")
        return self

    def operations(self) -> list[tuple[str, float]]:
        return [(name, getattr(self, name)) for name in OPERATIONS if getattr(self, name) > 0]


Synonyms = Callable[[str], list[str]]


def wordnet_synonyms() -> Synonyms:
    """Synonyms of a word from the WordNet tunelab ships (every sense, lemma names as words)."""
    from tunelab.evaluate.wordnet import load_wordnet

    wordnet = load_wordnet()
    cache: dict[str, list[str]] = {}

    def synonyms(word: str) -> list[str]:
        key = word.lower()
        if key not in cache:
            names = {lemma.replace("_", " ").replace("-", " ") for synset in wordnet.synsets(key) for lemma in synset.lemma_names()}
            cache[key] = sorted(n for n in names if n.lower() != key and n.isascii())
        return cache[key]

    return synonyms


def _changes(rate: float, words: int) -> int:
    return max(1, round(rate * words))


def _candidates(words: Sequence[str], synonyms: Synonyms) -> list[int]:
    return [i for i, w in enumerate(words) if w.isalpha() and w.lower() not in STOP_WORDS and synonyms(w)]


def synonym_replacement(words: list[str], rate: float, rng: random.Random, synonyms: Synonyms) -> list[str]:
    """Replace ``max(1, round(rate * n))`` distinct non-stop words that have synonyms (fewer if fewer have)."""
    out = list(words)
    picks = _candidates(words, synonyms)
    rng.shuffle(picks)
    for i in picks[: _changes(rate, len(words))]:
        out[i] = rng.choice(synonyms(words[i]))
    return out


def random_insertion(words: list[str], rate: float, rng: random.Random, synonyms: Synonyms) -> list[str]:
    """Insert ``max(1, round(rate * n))`` synonyms of random words at random positions."""
    out = list(words)
    sources = _candidates(words, synonyms)
    if not sources:
        return out
    for _ in range(_changes(rate, len(words))):
        out.insert(rng.randrange(len(out) + 1), rng.choice(synonyms(words[rng.choice(sources)])))
    return out


def random_swap(words: list[str], rate: float, rng: random.Random, synonyms: Synonyms) -> list[str]:
    """Swap two random words, ``max(1, round(rate * n))`` times."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(_changes(rate, len(words))):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], rate: float, rng: random.Random, synonyms: Synonyms) -> list[str]:
    """Drop each word with probability ``rate``, always keeping at least one."""
    kept = [w for w in words if rng.random() >= rate]
    return kept or [rng.choice(words)]


def masking(token: str) -> Callable[[list[str], float, random.Random, Synonyms], list[str]]:
    def mask(words: list[str], rate: float, rng: random.Random, synonyms: Synonyms) -> list[str]:
        """Replace each word by ``token`` with probability ``rate``."""
        return [token if rng.random() < rate else w for w in words]

    return mask


def augment_text(text: str, operation: str, rate: float, rng: random.Random, synonyms: Synonyms, mask_token: str) -> str:
    words = text.split()
    if not words:
        return text
    apply = {
        "synonym": synonym_replacement, "insert": random_insertion, "swap": random_swap,
        "delete": random_deletion, "mask": masking(mask_token),
    }[operation]
    return " ".join(apply(words, rate, rng, synonyms))


def _augment_record(record: Record, change: Callable[[str], str]) -> Record:
    """``record`` with its input side changed: the text, or each user turn."""
    if record.text is not None and record.words is None and record.texts is None:
        return dataclasses.replace(record, text=change(record.text))
    if record.messages is not None and record.chosen is None:
        messages = [{**m, "content": change(m["content"])} if m.get("role") == "user" and isinstance(m.get("content"), str) else m for m in record.messages]
        return dataclasses.replace(record, messages=messages)
    raise UserError(
        "data.augment rewrites a text or a conversation's user turns; this row is word-tagged, a group of texts or a preference pair",
        where=record.where, hint="remove data.augment for this data",
    )


@dataclasses.dataclass
class AugmentReport:
    """Rows each operation added, and a few originals beside their copies (``data_report.json``)."""

    added: dict[str, int]
    unchanged: int
    samples: list[dict[str, Any]]
    #: Copies dropped by ``keep_if_label``, per operation.
    filtered: dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def augment_records(
    records: Sequence[Record], cfg: AugmentConfig, seed: int, mask_token: str, synonyms: Synonyms | None = None, samples: int = 3
) -> tuple[list[Record], AugmentReport]:
    """``records`` followed by their augmented copies (identical copies left out, and with
    ``keep_if_label`` those the classifier no longer labels like their row); up to ``samples``
    examples of each operation for the report."""
    operations = cfg.operations()
    if synonyms is None:
        synonyms = wordnet_synonyms() if any(name in ("synonym", "insert") for name, _ in operations) else (lambda word: [])
    candidates: list[tuple[Record, Record, str]] = []
    unchanged = 0

    def offer(record: Record, augmented: Record, name: str) -> None:
        nonlocal unchanged
        if augmented.key() == record.key():
            unchanged += 1
        else:
            candidates.append((record, augmented, name))

    for row, record in enumerate(records):
        for copy in range(cfg.copies if operations else 0):
            name, rate = operations[copy % len(operations)]
            rng = random.Random(f"{seed}:{row}:{copy}")
            offer(record, _augment_record(record, lambda text: augment_text(text, name, rate, rng, synonyms, mask_token)), name)
    if cfg.rewrite is not None:
        rewrites = rewrite_texts(cfg.rewrite, seed, [t for r in records for t in input_texts(r)])
        for record in records:
            for copy in range(cfg.rewrite.copies):
                offer(record, _augment_record(record, lambda text: rewrites[text][copy] or text), "rewrite")
    filtered: Counter[str] = Counter()
    if cfg.keep_if_label is not None and candidates:
        labels = predict_labels(cfg.keep_if_label, seed, [_labelled_text(augmented) for _, augmented, _ in candidates])
        kept = [c for c, label in zip(candidates, labels) if label == str(c[1].label)]
        filtered.update(c[2] for c, label in zip(candidates, labels) if label != str(c[1].label))
        candidates = kept
    added: Counter[str] = Counter(name for _, _, name in candidates)
    shown: list[dict[str, Any]] = []
    for record, augmented, name in candidates:
        if sum(1 for s in shown if s["operation"] == name) < samples:
            shown.append({"operation": name, "original": _shown(record), "augmented": _shown(augmented)})
    return [*records, *(augmented for _, augmented, _ in candidates)], AugmentReport(dict(added), unchanged, shown, dict(filtered))


def _labelled_text(record: Record) -> str:
    if record.text is None or not isinstance(record.label, (str, int)):
        raise UserError("data.augment.keep_if_label checks a text's single label; this row has none", where=record.where, hint="remove keep_if_label")
    return record.text


def input_texts(record: Record) -> list[str]:
    """The texts augmentation may change: a record's text, or its user turns."""
    texts: list[str] = []
    _augment_record(record, lambda text: texts.append(text) or text)
    return texts


def mask_token(tokenizer: Any) -> str:
    """What masking writes: the tokenizer's mask token, else its unknown token, else "_"."""
    return getattr(tokenizer, "mask_token", None) or getattr(tokenizer, "unk_token", None) or "_"


def _shown(record: Record) -> str:
    if record.text is not None:
        return record.text
    return " | ".join(m["content"] for m in record.messages or [] if m.get("role") == "user")
