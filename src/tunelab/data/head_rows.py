"""Row checks for the shapes beyond chat SFT and single-label classification.

- ``multi_label``: ``text`` + ``labels`` (a list of label names, possibly empty)
- ``regression``: ``text`` + ``label`` (a number)
- ``token_classification``: ``tokens`` (words) + ``tags`` (one per word)
- ``pairs``: ``anchor`` + ``positive`` (+ optional ``negative``), for contrastive embeddings
- ``sentences``: ``text`` alone, encoded with the tokenizer's special tokens (SimCSE, masked LM)
- ``multiple_choice``: ``question`` + ``choices`` (list) + ``label`` (the answer's index or text)

Per-example fields (weight, difficulty, language) are read for every shape in ``example_fields``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tunelab.data.config import DataConfig
from tunelab.data.prompting import render
from tunelab.data.records import (
    Record,
    missing_field,
    number_field,
    string_field,
    string_list,
)
from tunelab.errors import UserError

HEAD_SHAPES = {
    "multi_label": "text + labels",
    "regression": "text + label (a number)",
    "token_classification": "tokens + tags",
    "pairs": "anchor + positive (+ negative)",
    "sentences": "text",
    "multiple_choice": "question + choices + label",
}


def head_record(fields: Mapping[str, Any], shape: str, cfg: DataConfig, where: str) -> Record:
    """Validate one row for ``shape`` (one of ``HEAD_SHAPES``)."""
    if shape == "token_classification":
        words, tags = string_list(fields, "tokens", where), string_list(fields, "tags", where)
        if len(words) != len(tags) or not words:
            raise UserError(f"{len(words)} tokens but {len(tags)} tags", where=where, hint="give exactly one tag per token (and at least one token)")
        return Record(where, words=words, tags=tags)
    if shape == "pairs":
        anchor = _text(fields, "anchor", cfg, where)
        positive = fields.get("positive")
        if not isinstance(positive, str) or not positive.strip():
            raise UserError(
                "contrastive row without a positive", where=where, hint="give every row a non-empty 'positive' text (the anchor's match)"
            )
        negative = fields.get("negative")
        if negative is not None and not isinstance(negative, str):
            raise UserError(f"'negative' must be a string, got {type(negative).__name__}", where=where)
        return Record(where, texts=[anchor, positive, negative or None])
    if shape == "multiple_choice":
        question, choices = _text(fields, "question", cfg, where), string_list(fields, "choices", where)
        if len(choices) < 2:
            raise UserError(f"{len(choices)} choice(s); a multiple-choice row needs at least two", where=where)
        return Record(where, text=question, texts=list(choices), label=_answer_index(fields, choices, where))
    text = _text(fields, "text", cfg, where)
    if shape == "multi_label":
        return Record(where, text=text, label=string_list(fields, "labels", where))
    if shape == "regression":
        return Record(where, text=text, label=number_field(fields, "label", where, what="regression target"))
    if shape == "sentences":
        return Record(where, text=text)
    raise ValueError(f"not an extra shape: {shape}")


def _text(fields: Mapping[str, Any], name: str, cfg: DataConfig, where: str) -> str:
    return render(cfg.prompt_template, fields, where) if cfg.prompt_template and name in ("text", "question") else string_field(fields, name, where)


def _answer_index(fields: Mapping[str, Any], choices: list[str], where: str) -> int:
    """The correct choice: an index into ``choices`` or the text of one of them."""
    label = fields.get("label")
    if label is None:
        raise missing_field("label", fields, where)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(choices):
        return label
    if isinstance(label, str) and label in choices:
        return choices.index(label)
    if isinstance(label, str) and label.isdigit() and int(label) < len(choices):
        return int(label)
    raise UserError(
        f"label {label!r} is neither a choice index (0-{len(choices) - 1}) nor one of the choices", where=where
    )
