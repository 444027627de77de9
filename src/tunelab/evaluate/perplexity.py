"""Perplexity: the exact token-level mean negative log-likelihood of a causal LM on texts.

Every token after the first of each text is scored exactly once, so the number is comparable
across batch sizes and window settings. Texts longer than ``max_length`` are scored with a
sliding window (Hugging Face's "strided" recipe): each window predicts ``stride`` new tokens
and sees the ``max_length - stride`` tokens before them as context. Windows are batched with
right padding; padded positions never enter the sum because the model is causal and their
labels are masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.errors import UserError


@dataclass(frozen=True)
class Window:
    """A slice ``ids[begin:end]`` of one text whose positions ``first_target..end-1`` are scored."""

    text: int
    begin: int
    end: int
    first_target: int


def plan_windows(n_tokens: int, max_length: int, stride: int, text: int = 0) -> list[Window]:
    """Cover positions 1..n_tokens-1 with disjoint scored ranges, each window at most ``max_length``."""
    windows: list[Window] = []
    scored_until = 1  # position 0 has no context, so it is never scored
    while scored_until < n_tokens:
        end = min(n_tokens, max_length if not windows else scored_until + stride)
        windows.append(Window(text, max(0, end - max_length), end, scored_until))
        scored_until = end
    return windows


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    *,
    max_length: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
) -> dict[str, float | int]:
    """Score ``texts`` with ``model``: ``nll`` (nats/token), ``perplexity``, ``bits_per_token``, ``tokens``.

    ``stride`` is how many new tokens each sliding window scores (default ``max_length // 2``);
    it must be smaller than ``max_length`` so every scored token keeps some context.
    """
    stride = max_length // 2 if stride is None else stride
    if max_length < 2:
        raise UserError(f"perplexity max_length must be at least 2, got {max_length}")
    if not 1 <= stride < max_length:
        raise UserError(f"perplexity stride must be in [1, max_length), got {stride} with max_length {max_length}")
    if batch_size < 1:
        raise UserError(f"perplexity batch_size must be positive, got {batch_size}")
    encoded = [tokenizer(text)["input_ids"] for text in texts]
    windows = [w for i, ids in enumerate(encoded) for w in plan_windows(len(ids), max_length, stride, i)]
    if not windows:
        raise UserError("no tokens to score: every text is empty or a single token", hint="pass longer texts")
    windows.sort(key=lambda w: w.end - w.begin, reverse=True)  # similar lengths share a batch: less padding
    total_nll = 0.0
    total_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                nll, count = _score_batch(model, encoded, windows[start : start + batch_size])
                total_nll += nll
                total_tokens += count
    finally:
        model.train(was_training)
    mean = total_nll / total_tokens
    return {"nll": mean, "perplexity": math.exp(mean), "bits_per_token": mean / math.log(2), "tokens": total_tokens}


def _score_batch(model: torch.nn.Module, encoded: list[list[int]], batch: list[Window]) -> tuple[float, int]:
    """Summed NLL and number of scored tokens of one padded batch of windows."""
    width = max(w.end - w.begin for w in batch)
    device = next(model.parameters()).device
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, w in enumerate(batch):
        ids = torch.tensor(encoded[w.text][w.begin : w.end])
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
        scored = slice(w.first_target - w.begin, len(ids))
        labels[row, scored] = ids[scored]
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
    targets = labels[:, 1:].to(device)
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return nll.item(), int((targets != -100).sum())
