"""Tokenize the records of the shapes in ``head_rows`` into ``Example``s.

Every text is tokenized with the tokenizer's own special tokens (an encoder's ``[CLS]``/``[SEP]``,
which its heads and pooling read) and cut to ``data.max_length`` by the tokenizer, so the special
tokens survive truncation.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from tunelab.data.bundle import IGNORE_INDEX, Example
from tunelab.data.config import DataConfig
from tunelab.data.labels import label_id
from tunelab.data.records import Record
from tunelab.data.tokenize import tokenize_for_classification


def encode_head_example(
    tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, shape: str, record: Record, label_index: dict[str, int] | None, declared: bool
) -> tuple[Example, bool]:
    """``(example, was_truncated)`` for one record of ``shape``."""
    if shape == "token_classification":
        return _tagged(tokenizer, cfg, record, label_index or {}, declared)
    if shape == "pairs":
        encoded = [None if t is None else tokenize_for_classification(tokenizer, t, cfg.max_length, cfg.truncation_side) for t in record.texts or []]
        group = [None if e is None else e[0] for e in encoded]
        return Example(group[0] or [], [], group=group), any(e is not None and e[1] for e in encoded)
    if shape == "multiple_choice":
        encoded = [_pair(tokenizer, record.text or "", choice, cfg.max_length) for choice in record.texts or []]
        group = [ids for ids, _ in encoded]
        return Example(group[0], [], label=int(record.label), group=list(group)), any(cut for _, cut in encoded)
    ids, cut = tokenize_for_classification(tokenizer, record.text or "", cfg.max_length, cfg.truncation_side)
    if shape == "multi_label":
        hot = [0.0] * len(label_index or {})
        for value in record.label or []:
            hot[label_id(record, label_index or {}, declared, value)] = 1.0
        return Example(ids, [], targets=hot), cut
    if shape == "regression":
        return Example(ids, [], targets=[float(record.label)]), cut
    if shape == "sentences":
        return Example(ids, [], word_ids=_word_ids(tokenizer, record.text or "", len(ids), cfg)), cut
    raise ValueError(f"not an extra shape: {shape}")


def _tagged(
    tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, record: Record, index: dict[str, int], declared: bool
) -> tuple[Example, bool]:
    """Label the first sub-token of each word with its tag; other sub-tokens and specials get no loss."""
    words, tags = record.words or [], record.tags or []
    full = tokenizer(words, is_split_into_words=True)
    encoding = tokenizer(words, is_split_into_words=True, truncation=True, max_length=cfg.max_length)
    labels, previous = [], None
    for word in encoding.word_ids():
        labels.append(IGNORE_INDEX if word is None or word == previous else label_id(record, index, declared, tags[word]))
        previous = word
    return Example(list(encoding["input_ids"]), labels), len(full["input_ids"]) > cfg.max_length


def _pair(tokenizer: PreTrainedTokenizerBase, question: str, choice: str, max_length: int) -> tuple[list[int], bool]:
    """Question and choice as one sequence (a sentence pair: ``[CLS] q [SEP] c [SEP]`` on encoders);
    a long question is cut from its start so the choice is always seen whole."""
    full = tokenizer(question, choice)["input_ids"]
    if len(full) <= max_length:
        return list(full), False
    saved = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        ids = tokenizer(question, choice, truncation="only_first", max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = saved
    return list(ids), True


def _word_ids(tokenizer: PreTrainedTokenizerBase, text: str, length: int, cfg: DataConfig) -> list[int] | None:
    """Word index per token (-1 for specials) for whole-word masking; None for slow tokenizers."""
    if not tokenizer.is_fast:
        return None
    encoding = tokenizer(text, truncation=True, max_length=cfg.max_length)
    words = [-1 if w is None else w for w in encoding.word_ids()]
    return words if len(words) == length else None
