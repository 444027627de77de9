"""LoRA dropout with masks made from random bits: the same Bernoulli dropout, far cheaper masks.

peft drops each adapter's input with ``nn.Dropout``, whose CPU mask comes from ``bernoulli_``,
one draw of torch's generator per element. On the AVX-512 BF16 EPYC (2 threads) that is 1.4 ms for
a ``[368, 576]`` input and 4.8 ms for ``[368, 1536]``: the seven adapters of one SmolLM2 block
spend ~13 ms a step drawing masks, and a LoRA step with dropout 0.05 took 1,148 ms against 811 ms
with none (bench/README.md, session 33). Here a mask is 16 random bits per element, an element
kept where its bits are at least ``p · 2¹⁶`` above the minimum: a Bernoulli draw with ``p``
rounded to a multiple of 2⁻¹⁶ (0.05 becomes 0.050003), the kept values scaled by the reciprocal
of the rounded keep probability, so the expectation is the input's, as ``nn.Dropout``'s is. The
bits are splitmix64's output function of a counter (four elements per 64-bit word) from a seed
that is one draw of torch's default generator per mask (``block_kernels.keep_bits``: one C++
pass, or the same words in wrapping int64 arithmetic without a compiler). Drawing the words with
``random_`` instead (sessions 33-35) took 0.31 ms for ``[368, 576]`` and 0.82 ms for
``[368, 1536]`` on the AMX Xeon (2 threads); the kernel takes 0.06 and 0.16 ms, and applying the
mask is a one-pass kernel too (``block_kernels.masked_scale``; bench/README.md, session 36). The
mask is kept as booleans for the backward pass (``nn.Dropout`` keeps it in the input's dtype).

Because each mask's seed is drawn from torch's default generator, a seeded run repeats itself and
activation checkpointing, which restores the generator's state, recomputes the same masks. They
are not ``nn.Dropout``'s draws: a run with ``bit_dropout`` and one without see different masks.

The fused LoRA functions (``fused_projections``, ``fused_mlp``, ``fused_block``) draw the same
masks themselves: one ``keep_mask`` per adapter, in the order the unfused modules call their
dropouts, so a fused and an unfused step with one seed drop the same elements. They fold the
scale into the adapter's (``scale · keep_scale``) and apply the mask to the input in the compute
dtype (``masked``), keeping the booleans for the backward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from tunelab.methods.peft_adapters import LoraParts, lora_dropouts
from tunelab.train.block_kernels import keep_bits, masked_add_, masked_scale

BITS = 16


def keep_scale(p: float) -> float:
    """The factor that keeps a dropped input's expectation: the reciprocal of the keep probability
    with ``p`` rounded to a multiple of 2⁻¹⁶ as ``keep_mask`` rounds it."""
    return 2**BITS / (2**BITS - round(p * 2**BITS))


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A boolean mask keeping each element with probability ``1 - p`` (``p`` rounded to a
    multiple of 2⁻¹⁶), and the scale that keeps the expectation."""
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))  # one draw of the default generator
    return keep_bits(shape.numel(), seed, round(p * 2**BITS), device).view(shape), keep_scale(p)


class _BitDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:  # type: ignore[override]
        keep, scale = keep_mask(x.shape, p, x.device)
        ctx.scale = scale
        ctx.save_for_backward(keep)
        return masked_scale(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return masked_scale(grad.contiguous(), keep, ctx.scale), None


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


def fused_rate(parts: Sequence[LoraParts]) -> float | None:
    """The dropout rate a fused function applies to the inputs of all of ``parts`` (0.0: none), or
    None where it cannot draw their masks as their own modules would: rates that differ, or a
    dropout that is not a ``BitDropout`` (peft's ``nn.Dropout`` draws with ``bernoulli_``; with
    ``bit_dropout`` off, the unfused modules keep those draws)."""
    rates = {p.dropout for p in parts}
    if len(rates) != 1:
        return None
    rate = rates.pop()
    return rate if rate == 0 or all(type(p.dropper) is BitDropout for p in parts) else None


def dropped_scales(scales: tuple[float, ...], p: float) -> tuple[float, ...]:
    """Adapter scales with dropout ``p``'s ``keep_scale`` folded in (unchanged for ``p`` 0)."""
    return tuple(s * keep_scale(p) for s in scales) if p else tuple(scales)


def draw_keep(x: torch.Tensor, p: float) -> torch.Tensor | None:
    """A ``keep_mask`` for ``x`` as a ``BitDropout`` of rate ``p`` would draw it (None for ``p`` 0)."""
    return keep_mask(x.shape, p, x.device)[0] if p else None


def masked(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``x`` with the elements ``keep`` drops zeroed (``x`` itself without a mask); the scale is the
    caller's, folded into the adapter's."""
    return x if keep is None else masked_scale(x, keep)


def add_masked_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``out += masked(a @ b, keep)`` in place: an adapter's share of its input's gradient."""
    return out.addmm_(a, b) if keep is None else masked_add_(out, a @ b, keep)
