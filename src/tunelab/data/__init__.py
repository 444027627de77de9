"""The data stage: read files, apply templates, tokenize with loss masks, batch.

The trainer calls ``build_datasets`` once, then ``collate_packed`` (causal LMs) or
``collate_padded`` (encoders, classification) per batch. ``tunelab.data.prompting`` holds the
prompt/few-shot helpers that evaluation shares.
"""

from tunelab.data.build import build_datasets
from tunelab.data.bundle import IGNORE_INDEX, DataBundle, DataReport, Example
from tunelab.data.collate import (
    batch_tokens,
    collate_packed,
    collate_padded,
    pad_packed_row,
    preference_sequences,
)
from tunelab.data.config import DataConfig

__all__ = [
    "IGNORE_INDEX",
    "DataBundle",
    "DataConfig",
    "DataReport",
    "Example",
    "batch_tokens",
    "build_datasets",
    "collate_packed",
    "collate_padded",
    "pad_packed_row",
    "preference_sequences",
]
