"""LoRA dropout with masks made from random bits: the same Bernoulli dropout, ~3-5x cheaper.

peft drops each adapter's input with ``nn.Dropout``, whose CPU mask comes from ``bernoulli_``,
one draw of torch's generator per element. On the AVX-512 BF16 EPYC (2 threads) that is 1.4 ms for
a ``[368, 576]`` input and 4.8 ms for ``[368, 1536]``: the seven adapters of one SmolLM2 block
spend ~13 ms a step drawing masks, and a LoRA step with dropout 0.05 took 1,148 ms against 811 ms
with none; with these masks 1,008 ms, and the quickstart trained in 59 s instead of 75 s
(bench/README.md, session 33). Here a mask is 16 random bits per element, drawn 64 at a
time by ``random_`` on ``int64`` over its full range, an element kept where its bits are at least
``p · 2¹⁶`` above the minimum: a Bernoulli draw with ``p`` rounded to a multiple of 2⁻¹⁶ (0.05
becomes 0.050003), the kept values scaled by the reciprocal of the rounded keep probability, so
the expectation is the input's, as ``nn.Dropout``'s is. 0.96 ms for ``[368, 1536]``. The mask
is kept as booleans for the backward pass (``nn.Dropout`` keeps it in the input's dtype).

The draws come from torch's default generator, so a seeded run repeats itself and activation
checkpointing, which restores the generator's state, recomputes the same masks. They are not
``nn.Dropout``'s draws: a run with ``bit_dropout`` and one without see different masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from tunelab.methods.peft_adapters import lora_dropouts

BITS = 16


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A boolean mask keeping each element with probability ``1 - p`` (``p`` rounded to a
    multiple of 2⁻¹⁶), and the scale that keeps the expectation."""
    count = shape.numel()
    dropped = round(p * 2**BITS)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    bits = words.view(torch.int16)[:count].view(shape)
    return bits >= dropped - 2 ** (BITS - 1), 2**BITS / (2**BITS - dropped)


class _BitDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:  # type: ignore[override]
        keep, scale = keep_mask(x.shape, p, x.device)
        ctx.scale = scale
        ctx.save_for_backward(keep)
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None


class BitDropout(nn.Dropout):
    """``nn.Dropout`` with the mask from ``keep_mask``; an ``nn.Dropout`` to whoever checks (the
    fused LoRA functions read its ``p`` and step aside while it drops)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return _BitDropout.apply(x, self.p)


@contextlib.contextmanager
def bit_dropout(model: nn.Module) -> Iterator[int]:
    """Give every LoRA adapter of ``model`` whose input dropout is an ``nn.Dropout`` a
    ``BitDropout`` with the same ``p`` while the context lasts; yields how many."""
    swapped: list[tuple[nn.ModuleDict, str, nn.Module]] = []
    for holder, name in lora_dropouts(model):
        dropout = holder[name]
        if type(dropout) is nn.Dropout and dropout.p > 0:
            holder[name] = BitDropout(dropout.p).train(dropout.training)
            swapped.append((holder, name, dropout))
    try:
        yield len(swapped)
    finally:
        for holder, name, dropout in swapped:
            dropout.train(holder[name].training)
            holder[name] = dropout
