"""Shared set-up for compression tests: the tiny model and chunks of the shipped calibration text."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.compress import calibration
from tunelab.models import load_model

CALIBRATION = Path(__file__).resolve().parent.parent / "examples" / "data" / "heldout" / "calibration.txt"


def calibration_chunks(length: int, count: int, tokenizer=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``count`` rows of ``length`` tokens of calibration text (tiny-llama's tokenizer by default)."""
    tokenizer = tokenizer or load_model("tiny-llama").tokenizer
    return calibration.token_chunks(tokenizer, calibration.read_texts(CALIBRATION), length, count)
