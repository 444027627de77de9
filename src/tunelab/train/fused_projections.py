"""LoRA-adapted projections that read the same input (an attention block's q, k and v) as one
autograd function.

peft computes each adapted projection on its own: the base matmul, the adapter's down and up
matmuls (each weight cast for autocast), the scale and the add, ~7 operations forward and ~12
backward, and the input's gradient is summed from six branches. q, k and v read the same hidden
states, so their three rank-r down-projections are one matmul (``[tokens, 3r]``), each scale is
folded into an in-place ``addmm_`` on the base product, and the backward is written out: the three
down-projections' weight gradients are one matmul and the input's gradient one chain of ``addmm_``.
What is saved is what peft saves (the input, the rank-r products, the weights in the compute dtype).
With LoRA dropout (``bit_dropout``'s masks, drawn here in q, k, v order as the unfused layers draw
them) each adapter reads its own masked input, so the down-projections are three products and
each mask is kept as booleans.

The attention module calls ``q_proj``, ``k_proj`` and ``v_proj`` itself, so the fused call is
made by ``q_proj``: its patched forward computes all three and leaves k and v for the next two
calls, which take them only when they are handed the very same input tensor (a cross-attention's
keys come from elsewhere and are computed as before). Anything ``fused_mlp`` steps aside for
(a disabled or merged adapter, peft's own ``nn.Dropout`` draws in training, a hook, extra
arguments) takes peft's own forward here too.

Measured on SmolLM2-135M LoRA (bench/README.md, "Session 25").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tunelab.methods.peft_adapters import LoraParts, lora_parts
from tunelab.train.bit_dropout import add_masked_product, draw_keep, dropped_scales, fused_rate, masked
from tunelab.train.fused_mlp import adapter_up_grad

NAMES = ("q_proj", "k_proj", "v_proj")


def projections_forward(x: torch.Tensor, dtype: torch.dtype, scales: tuple[float, ...], weights: tuple[torch.Tensor, ...],
                        rate: float = 0.0) -> tuple[list[torch.Tensor], tuple[torch.Tensor | None, ...]]:
    """``[x W_iᵀ + s_i (drop_i(x) A_iᵀ) B_iᵀ]`` for the ``(W_i, A_i, B_i)`` triples of ``weights``, as
    ``[tokens, out_i]`` products in ``dtype``, and what ``projections_backward`` needs. With a dropout
    ``rate`` each adapter draws its own mask (``bit_dropout.draw_keep``, in the triples' order)."""
    frozen, downs, ups = weights[0::3], weights[1::3], weights[2::3]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    down = torch.cat(downs).to(dtype)  # [projections × r, in]
    if rate:  # one input per adapter, each through its own mask: one down-product each
        keeps = [draw_keep(x2, rate) for _ in downs]
        low = torch.cat([masked(x2, keep) @ a.t() for keep, a in zip(keeps, down.split([a.shape[0] for a in downs]))], dim=1)
    else:
        keeps, low = [], x2 @ down.t()
    scales = dropped_scales(scales, rate)
    lows = low.split([a.shape[0] for a in downs], dim=1)
    frozen, ups = [w.to(dtype) for w in frozen], [b.to(dtype) for b in ups]
    outs = [(x2 @ w.t()).addmm_(part, b.t(), alpha=s) for w, part, b, s in zip(frozen, lows, ups, scales)]
    return outs, (x2, low, down, *frozen, *ups, *keeps)


def projections_backward(saved: tuple[torch.Tensor | None, ...], scales: tuple[float, ...], ranks: list[int], d_outs: list[torch.Tensor],
                         input_grad: bool, rate: float = 0.0) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The input's gradient (``[tokens, in]``, None unless ``input_grad``) and the adapters' weight
    gradients ``[d_A_0, d_B_0, d_A_1, ...]`` (in the compute dtype) from the outputs' gradients."""
    count = len(scales)
    x2, low, down, *rest = saved
    frozen, ups, keeps = rest[:count], rest[count : 2 * count], rest[2 * count :]
    scales = dropped_scales(scales, rate)
    d_outs = [g.reshape(-1, g.shape[-1]).to(x2.dtype) for g in d_outs]
    lows = low.split(ranks, dim=1)
    d_ups = [adapter_up_grad(d, part, s) for d, part, s in zip(d_outs, lows, scales)]
    d_low = torch.cat([(d @ b) * s for d, b, s in zip(d_outs, ups, scales)], dim=1)
    if rate:
        d_lows, a_parts = d_low.split(ranks, dim=1), down.split(ranks)
        d_downs = [d.t() @ masked(x2, keep) for d, keep in zip(d_lows, keeps)]
    else:
        d_downs = (d_low.t() @ x2).split(ranks)
    d_x = None
    if input_grad:
        d_x = d_outs[0] @ frozen[0]
        for d, w in zip(d_outs[1:], frozen[1:]):
            d_x.addmm_(d, w)
        if rate:
            for d, a, keep in zip(d_lows, a_parts, keeps):
                add_masked_product(d_x, d, a, keep)
        else:
            d_x.addmm_(d_low, down)
    return d_x, [g for d_down, d_up in zip(d_downs, d_ups) for g in (d_down, d_up)]


class _FusedLoraProjections(torch.autograd.Function):
    """``y_i = x W_iᵀ + s_i (x A_iᵀ) B_iᵀ`` for every ``(W_i, A_i, B_i)`` sharing the input ``x``."""

    @staticmethod
    def forward(ctx, x, settings, *weights):  # type: ignore[override]
        dtype, scales, rate = settings
        outs, saved = projections_forward(x, dtype, scales, weights, rate)
        ctx.settings = settings
        ctx.dtypes = [t.dtype for t in (x, *weights)]
        ctx.ranks = [a.shape[0] for a in weights[1::3]]
        ctx.save_for_backward(*saved)
        return tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        _, scales, rate = ctx.settings
        # no input gradient for the first block's input: the embeddings' output needs none
        d_x, adapter_grads = projections_backward(ctx.saved_tensors, scales, ctx.ranks, list(grads), ctx.needs_input_grad[0], rate)
        if d_x is not None:
            d_x = d_x.view(*grads[0].shape[:-1], d_x.shape[-1])
        per_weight = [g for d_down, d_up in zip(adapter_grads[0::2], adapter_grads[1::2]) for g in (None, d_down, d_up)]
        wanted = (d_x, *per_weight)
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:])
        cast = [g.to(t) if g is not None and need else None for g, t, need in zip(wanted, ctx.dtypes, needs)]
        return (cast[0], None, *cast[1:])


def fused_projections_call(parts: list[LoraParts], x: torch.Tensor, rate: float) -> tuple[torch.Tensor, ...]:
    """Every projection of ``parts`` applied to ``x`` through ``_FusedLoraProjections``, their
    adapters' inputs dropped at ``rate``."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    settings = (dtype, tuple(p.scale for p in parts), rate)
    weights = [t for p in parts for t in (p.weight, p.a, p.b)]
    with torch.autocast(device, enabled=False):  # the function casts to ``dtype`` itself
        return _FusedLoraProjections.apply(x, settings, *weights)


class _SharedInputGroup:
    """q/k/v of one attention module, patched: ``q_proj`` computes all three, the others take theirs."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.pending: dict[int, torch.Tensor] = {}
        self.input: torch.Tensor | None = None

    def lead(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.pending.clear()
        self.input = None
        parts = [lora_parts(layer) for layer in self.layers]
        rate = None if args or kwargs or any(p is None for p in parts) else fused_rate(parts)  # type: ignore[arg-type]
        if rate is None:
            return type(self.layers[0]).forward(self.layers[0], x, *args, **kwargs)
        outs = fused_projections_call(parts, x, rate)  # type: ignore[arg-type]
        self.input, self.pending = x, dict(enumerate(outs))
        return self.pending.pop(0)

    def follow(self, index: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x is self.input and index in self.pending and not args and not kwargs:
            out = self.pending.pop(index)
            if not self.pending:
                self.input = None
            return out
        return type(self.layers[index]).forward(self.layers[index], x, *args, **kwargs)


def candidates(model: nn.Module) -> list[list[nn.Module]]:
    """Each module's q/k/v projections that are LoRA layers this function computes, reading inputs
    of one width."""
    found = []
    for module in model.modules():
        layers = [getattr(module, name, None) for name in NAMES]
        parts = [lora_parts(layer) if layer is not None else None for layer in layers]
        if all(p is not None for p in parts) and len({p.weight.shape[1] for p in parts}) == 1:  # type: ignore[union-attr]
            found.append(layers)
    return found


@contextlib.contextmanager
def fused_projections(model: nn.Module) -> Iterator[int]:
    """Run ``model``'s LoRA-adapted q/k/v projections through one function per attention module
    while the context lasts; yields how many modules."""
    patched = []
    for layers in candidates(model):
        group = _SharedInputGroup(layers)
        layers[0].forward = group.lead
        for index, layer in enumerate(layers[1:], start=1):
            layer.forward = lambda x, *args, _group=group, _index=index, **kwargs: _group.follow(_index, x, *args, **kwargs)
        patched.append(layers)
    try:
        yield len(patched)
    finally:
        for layers in patched:
            for layer in layers:
                del layer.forward
