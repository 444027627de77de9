"""Row checks for the shapes beyond chat SFT and single-label classification.

- ``multi_label``: ``text`` + ``labels`` (a list of label names, possibly empty; Cohere's
  multi-label files call the list ``label``)
- ``regression``: ``text`` + ``label`` (a number)
- ``token_classification``: ``tokens`` (words) + ``tags`` (one per word)
- ``pairs``: ``anchor`` + ``positive`` (+ optional ``negative``), for contrastive embeddings;
  Cohere's rerank rows (``query``, ``relevant_passages``, ``hard_negatives``) become several pairs
  (``rerank_pairs``)
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
        return Record(where, text=text, label=string_list(fields, "labels" if fields.get("labels") is not None else "label", where))
    if shape == "regression":
        return Record(where, text=text, label=number_field(fields, "label", where, what="regression target"))
    if shape == "sentences":
        return Record(where, text=text)
    raise ValueError(f"not an extra shape: {shape}")


def rerank_pairs(fields: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """One Cohere rerank row as pair rows: every relevant passage and every hard negative used once,
    ``(query, passage j mod P, negative j)`` for j < max(P, H), the row's other fields kept."""
    query = string_field(fields, "query", where)
    passages = string_list(fields, "relevant_passages", where)
    negatives = string_list(fields, "hard_negatives", where) if fields.get("hard_negatives") is not None else []
    if not passages:
        raise UserError("'relevant_passages' is empty", where=where, hint="give every query at least one passage that answers it")
    rest = {k: v for k, v in fields.items() if k not in ("query", "relevant_passages", "hard_negatives")}
    count = max(len(passages), len(negatives))
    return [{**rest, "anchor": query, "positive": passages[j % len(passages)], "negative": negatives[j] if j < len(negatives) else None}
            for j in range(count)]


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
