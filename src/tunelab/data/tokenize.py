"""Tokenize raw text and classification inputs, and cut sequences to ``data.max_length``."""

from __future__ import annotations

from typing import Literal

from transformers import PreTrainedTokenizerBase

Side = Literal["left", "right"]


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a document for continued pretraining, ending in EOS.

    The EOS marks the document's end, so packed documents are separated the way the model saw
    them in pretraining and it learns to end a text.
    """
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def tokenize_for_classification(
    tokenizer: PreTrainedTokenizerBase, text: str, max_length: int, side: Side
) -> tuple[list[int], bool]:
    """``(input_ids, was_truncated)`` with the tokenizer's own special tokens kept.

    Truncation goes through the tokenizer, not a list slice, so an encoder keeps its ``[CLS]``
    (what its classification head reads) and ``[SEP]`` whichever side is cut.
    """
    ids = tokenizer(text)["input_ids"]
    if len(ids) <= max_length:
        return list(ids), False
    saved = tokenizer.truncation_side
    tokenizer.truncation_side = side
    try:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = saved
    return list(ids), True


def truncate(ids: list[int], labels: list[int], max_length: int, side: Side) -> tuple[list[int], list[int], bool]:
    """Cut a causal-LM sequence and its labels to ``max_length`` from ``side``."""
    if len(ids) <= max_length:
        return ids, labels, False
    if side == "right":
        return ids[:max_length], labels[:max_length], True
    return ids[-max_length:], labels[-max_length:], True
