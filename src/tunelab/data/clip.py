"""Cut over-long texts by characters before they are tokenized, so memory stays bounded by
``data.max_length`` whatever a row holds.

Tokenizing a 200 MB text to keep its first 512 tokens builds hundreds of millions of token
objects (tens of GB) first. No token of a vocabulary covers more characters than its longest
entry, so a text of ``(max_length + MARGIN) * longest`` characters still yields more than
``max_length`` tokens: clipping at that many characters (from the side truncation cuts) changes
nothing the model sees, only what tokenization costs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from transformers import PreTrainedTokenizerBase

from tunelab.data.records import Record

#: Tokens beyond ``max_length`` kept in a clipped text, so the tokenization of the cut's
#: neighbourhood never reaches the tokens that are kept.
MARGIN = 16


def char_budget(tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """Characters a text may keep without changing its first (or last) ``max_length`` tokens."""
    added = tokenizer.get_added_vocab()  # special tokens only match their literal text
    longest = max((len(token) for token in tokenizer.get_vocab() if token not in added), default=1)
    return (max_length + MARGIN) * max(1, longest)


def clip_record(record: Record, budget: int, side: Literal["left", "right"]) -> tuple[Record, bool]:
    """``(record with every text cut to budget characters from side, whether anything was cut)``.

    Word lists (tagged rows) keep ``budget`` words: every word is at least one token."""

    def clip(text: str | None) -> str | None:
        if text is None or len(text) <= budget:
            return text
        return text[:budget] if side == "right" else text[-budget:]

    long_text = any(t is not None and len(t) > budget for t in _texts(record))
    long_words = record.words is not None and len(record.words) > budget
    if not (long_text or long_words):
        return record, False
    changes: dict = {"text": clip(record.text)}
    if record.messages is not None:
        changes["messages"] = [{**m, "content": clip(m["content"])} for m in record.messages]
    if record.texts is not None:
        changes["texts"] = [clip(t) for t in record.texts]
    if long_words:
        keep = slice(None, budget) if side == "right" else slice(-budget, None)
        changes["words"] = record.words[keep]  # type: ignore[index]
        changes["tags"] = record.tags[keep] if record.tags is not None else None
    return replace(record, **changes), True


def _texts(record: Record) -> list[str | None]:
    return [record.text, *(m["content"] for m in record.messages or []), *(record.texts or [])]
