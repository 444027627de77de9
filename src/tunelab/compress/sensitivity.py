"""Per-layer sensitivity: how much quantizing one layer alone changes the model's predictions.

Selective precision keeps the layers whose quantization hurts most at full precision. The scan
swaps one layer at a time for its quantized version and measures the KL divergence of the
next-token distributions from the original model's on calibration text, so layers are ranked by
their effect on the output, not by a proxy such as weight range.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.compress.modules import set_module


@torch.no_grad()
def sensitivity_scan(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    quantized: Callable[[str, nn.Module], nn.Module],
    chunks: torch.Tensor,
) -> dict[str, float]:
    """KL(original ‖ one layer quantized) per token, for each layer in ``layers``."""
    was_training = model.training
    model.eval()
    try:
        reference = model(input_ids=chunks).logits.float().log_softmax(-1)
        scores = {}
        for name, layer in layers.items():
            set_module(model, name, quantized(name, layer))
            try:
                logp = model(input_ids=chunks).logits.float().log_softmax(-1)
            finally:
                set_module(model, name, layer)
            scores[name] = F.kl_div(logp, reference, log_target=True, reduction="sum").item() / chunks.numel()
    finally:
        model.train(was_training)
    return scores


def most_sensitive(scores: Mapping[str, float], count: int) -> list[str]:
    """The ``count`` layer names with the highest scores."""
    return sorted(scores, key=scores.__getitem__, reverse=True)[:count]
