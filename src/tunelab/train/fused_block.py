"""A LoRA-adapted decoder block as two autograd functions with hand-written backwards.

A Llama-family block on a packed row, with every projection LoRA-adapted, runs ~190 operators
forward and ~270 backward in eager PyTorch (counted with a ``TorchDispatchMode``, SmolLM2), each
paying a dispatch, most an autograd node, many a copy: the norms' fp32 intermediates, RoPE's
halves, the head transposes, the casts, the gradients summed from every branch that read a
tensor. On short rows, where the matmuls are small, that fixed part is a third of the step
(bench/README.md, "Session 34"). Here each half of the block is one function:

- ``_AttentionHalf``: ``h + o_proj(attention(rope(q, k), v))`` with ``q, k, v`` the adapted
  projections of ``rms_norm(h)``: the q/k/v products of ``fused_projections``, RoPE on the
  token-major heads, the padded per-segment attention of ``varlen_attention`` (its gathers and
  masks) for short segments and torch's CPU flash-attention kernel for each long one (``MATH_BELOW``
  keys or more, as ``varlen_sdpa`` runs them), and o_proj through the same projection function.
  Before session 38 a row with one long segment ran every layer unfused (the long workload's
  steps with a 130-350-token fortune): fused, such steps are ~10% faster.
- ``_MlpHalf``: ``h + mlp(rms_norm(h))`` with ``fused_mlp``'s products.

Each saves what its backward needs (the input, the norm's reciprocal RMS, the projections'
rank-r intermediates, the attention's gathered queries, keys, values and probabilities) and
computes the gradients by the chain rule written out, in the dtypes the unfused block uses (the
residual stream and the attention scores in fp32, products in the autocast dtype; the scores'
gradient meets q and k in that dtype too). The norms, RoPE and the MLP's ``silu(gate) · up``
run as one-pass C++ kernels (``block_kernels``) where they can be built. Where the frozen weights
are held in the compute dtype and the adapters have no dropout, the projections that read one
input run stacked (``stacked_projections``: q/k/v, o, gate/up and down, two matmuls each forward):
5-11% faster steps on the benchmark's rows (bench/README.md, "Session 38").

It applies where it computes what the block computes: a decoder layer with ``input_layernorm``,
``self_attn`` (q/k/v/o), ``post_attention_layernorm`` and a gated ``mlp``, every projection a plain
LoRA layer ``lora_parts`` accepts, frozen norms, and the layer's own forward equal to this one on a
probe packed row (measured at install, in fp32). At call time it also needs a packed row under
``varlen_attention``, no cache, no attention dropout, and LoRA dropout, if any, through ``bit_dropout`` (its
masks drawn here in the unfused layers' order: q, k, v, o, gate, up, down); anything else runs the
layer's own forward. A last block whose MLP ``last_block`` slices to the read positions keeps that MLP: only
its attention half is fused.

Measured on SmolLM2-135M LoRA (bench/README.md, "Session 35").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tunelab.data.collate import PADDING_SEGMENT
from tunelab.methods.peft_adapters import LoraParts, lora_parts, unwrap_peft
from tunelab.train.bit_dropout import fused_rate
from tunelab.train.block_kernels import block_kernels, rms_norm, rms_norm_backward, rope, rope_backward
from tunelab.train.fused_mlp import (
    ACTIVATIONS,
    PROBE_TOLERANCE,
    fused_forward,
    mlp_backward,
    mlp_forward,
    stacked_mlp_backward,
    stacked_mlp_forward,
)
from tunelab.train.fused_projections import projections_backward, projections_forward
from tunelab.train.stacked_projections import ProjectionStack
from tunelab.train.varlen_attention import NAME, RowLayout, attention_scale, gather_group, head_index, layout_for

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class _Attention:
    """One call's fixed inputs to ``_AttentionHalf``: the row's layout and the block's shapes."""

    layout: RowLayout
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    eps: float
    dtype: torch.dtype
    scales: tuple[float, ...]  # q, k, v, o adapters
    rate: float  # their inputs' dropout (bit_dropout's masks)
    stacks: tuple[ProjectionStack, ...] | None = None  # q/k/v and o stacked (``stacked_projections``)


def _rows(plan: _Attention, padded: list[torch.Tensor], long: list[torch.Tensor]) -> torch.Tensor:
    """The row's ``[tokens, heads, dim]`` from each padded group's ``[segments × kv heads, sharing ×
    longest, dim]`` query-side tensor (the attention's output, or its queries' gradient) and each
    long segment's ``[length, heads, dim]``: the real queries picked out, zeros for padding
    segments, back in row order."""
    scores = torch.promote_types(padded[0].dtype, torch.float32) if padded else None  # the key gather_group built the index under
    parts = [x.view(-1, plan.head_dim).index_select(0, head_index(group, plan.heads, plan.kv_heads, scores).outputs).view(-1, plan.heads, plan.head_dim)
             for group, x in zip(plan.layout.groups, padded)]
    parts += [x.to(parts[0].dtype) if parts else x for x in long]
    if plan.layout.skipped:  # padding segments: attended by nothing, their output zero
        parts.append(parts[0].new_zeros(plan.layout.skipped, plan.heads, plan.head_dim))
    out = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()  # one long segment: flash's [length, heads, dim] view
    return out.index_select(0, plan.layout.order) if plan.layout.order is not None else out


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[length, heads, dim]`` as sdpa's ``[1, heads, length, dim]`` (a view)."""
    return x.transpose(0, 1).unsqueeze(0)


def _suffix_bias(length: int, prefix: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A suffix's queries over its prefix's keys and then its own, causally (bottom-right aligned), as
    the additive mask sdpa makes of ``varlen_sdpa``'s boolean one."""
    sees = torch.ones(length, prefix + length, dtype=torch.bool, device=device).tril(diagonal=prefix)
    return torch.zeros(sees.shape, dtype=dtype, device=device).masked_fill_(~sees, float("-inf"))


def _long_forward(plan: _Attention, q_rows: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each long segment (``MATH_BELOW`` keys or more) through torch's CPU flash-attention kernel, as
    ``varlen_sdpa`` runs it for the unfused layer (queries and keys after RoPE in the compute dtype,
    the key/value heads shared natively); its ``[length, heads, dim]`` output, and five tensors each
    for ``_attention_backward``."""
    tokens, dim = q_rows.shape[0] // plan.heads, plan.head_dim
    q, k, v = (t.view(tokens, -1, dim) for t in (q_rows, k_rows, v_rows))
    outs, saved = [], []
    for s, e, ps, pe in plan.layout.long:
        keys, values = (x[s:e] if pe == ps else torch.cat([x[ps:pe], x[s:e]]) for x in (k, v))
        query, keys, values = (_heads_first(x.to(plan.dtype)) for x in (q[s:e], keys, values))
        bias = _suffix_bias(e - s, pe - ps, plan.dtype, q.device) if pe > ps else None
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, keys, values, 0.0, bias is None, attn_mask=bias, scale=plan.scale)
        outs.append(out[0].transpose(0, 1))
        saved += [query, keys, values, out, lse]
    return outs, saved


def _long_backward(plan: _Attention, saved: list[torch.Tensor], d_out: torch.Tensor, d_k: torch.Tensor, d_v: torch.Tensor) -> list[torch.Tensor]:
    """The long segments' query gradients ``[length, heads, dim]`` from ``d_out`` (theirs, in
    segment order), their keys' and values' added into ``d_k``, ``d_v`` (a prefix's too)."""
    tokens, dim = d_k.shape[0] // plan.kv_heads, plan.head_dim
    d_keys, d_values = d_k.view(tokens, -1, dim), d_v.view(tokens, -1, dim)
    start, d_queries = 0, []
    for number, (s, e, ps, pe) in enumerate(plan.layout.long):
        query, keys, values, out, lse = saved[5 * number : 5 * number + 5]
        grad = torch.empty_like(out).copy_(_heads_first(d_out[start : start + e - s]))  # laid out as the kernel's output
        start += e - s
        bias = _suffix_bias(e - s, pe - ps, plan.dtype, out.device) if pe > ps else None
        d_q, d_kk, d_vv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, query, keys, values, out, lse, 0.0, bias is None, attn_mask=bias, scale=plan.scale)
        d_queries.append(d_q[0].transpose(0, 1))
        for into, d in ((d_keys, d_kk[0].transpose(0, 1)), (d_values, d_vv[0].transpose(0, 1))):
            into[s:e] += d[pe - ps :].to(into.dtype)
            if pe > ps:
                into[ps:pe] += d[: pe - ps].to(into.dtype)
    return d_queries


def _attention_forward(plan: _Attention, q_rows: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The row's ``[tokens, heads, dim]`` attention output from token-major queries, keys and values,
    the short segments through their padded groups (``varlen_attention._short_segments``) and the
    long ones through flash attention (``_long_forward``), and the tensors ``_attention_backward``
    needs: four per group, then five per long segment."""
    outs, saved = [], []
    for group in plan.layout.groups:
        index, q, k, v = gather_group(group, q_rows, k_rows, v_rows, plan.heads, plan.kv_heads)
        probs = torch.softmax(torch.baddbmm(index.bias, q, k.transpose(-1, -2), alpha=plan.scale), dim=-1)
        outs.append(torch.bmm(probs.to(v.dtype), v))
        saved += [q, k, v, probs]
    long, saved_long = _long_forward(plan, q_rows, k_rows, v_rows) if plan.layout.long else ([], [])
    return _rows(plan, outs, long), saved + saved_long


def _attention_backward(plan: _Attention, saved: list[torch.Tensor], d_out: torch.Tensor,
                        d_k: torch.Tensor, d_v: torch.Tensor) -> torch.Tensor:
    """The queries' token-major gradient ``[tokens, heads, dim]`` from ``d_out`` (``[tokens, heads,
    dim]``, row order), and the keys' and values' added into ``d_k``, ``d_v`` (zeros on entry).

    A query sits in one padded slot (padding slots, which see key 0 alone, get a zero gradient),
    so its gradient is gathered from the slots as the forward gathers the outputs; a key or value
    can sit in several (a prefix's, in every segment continuing it), so theirs are added up."""
    if plan.layout.order is not None:  # a permutation: each segment-order row receives one row's gradient
        d_out = torch.empty_like(d_out).index_copy_(0, plan.layout.order, d_out)
    start, d_queries = 0, []
    for number, group in enumerate(plan.layout.groups):
        q, k, v, probs = saved[4 * number : 4 * number + 4]
        index = head_index(group, plan.heads, plan.kv_heads, probs.dtype)
        tokens = group.rows.shape[0]
        d_part = d_out[start : start + tokens].reshape(-1, plan.head_dim)
        start += tokens
        # the padded outputs: the real queries' gradients, zero for padding queries
        d_padded = d_part.new_zeros(q.shape[0] * q.shape[1], plan.head_dim).index_copy_(0, index.outputs, d_part).view(q.shape[0], q.shape[1], -1)
        d_probs = torch.bmm(d_padded, v.transpose(1, 2)).float()
        d_v.index_add_(0, index.keys, torch.bmm(probs.to(v.dtype).transpose(1, 2), d_padded).view(-1, plan.head_dim))
        d_scores = torch._softmax_backward_data(d_probs, probs, -1, probs.dtype).mul_(plan.scale)
        # the scores' gradient meets q and k in the values' dtype (fp32 accumulation inside the
        # product): bf16 products ~1.4x faster than fp32 here, with the gradients' error against an
        # fp32 step unchanged (bench/README.md, "Session 35")
        d_scores, q, k = d_scores.to(v.dtype), q.to(v.dtype), k.to(v.dtype)
        d_queries.append(torch.bmm(d_scores, k))
        d_k.index_add_(0, index.keys, torch.bmm(d_scores.transpose(1, 2), q).view(-1, plan.head_dim).to(d_k.dtype))
    long = _long_backward(plan, saved[4 * len(plan.layout.groups) :], d_out[start:], d_k, d_v) if plan.layout.long else []
    return _rows(plan, d_queries, long)


def _project(plan: _Attention, which: int, x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], tuple]:
    """q/k/v (``which`` 0) or o (1) of the ``[tokens, in]`` input: through the stack where the plan has
    one, else ``fused_projections``' function."""
    if plan.stacks is not None:
        return plan.stacks[which].forward(x.to(plan.dtype))
    scales = plan.scales[:3] if which == 0 else plan.scales[3:]
    return projections_forward(x, plan.dtype, scales, weights, plan.rate)


def _project_backward(plan: _Attention, which: int, saved: tuple, ranks: list[int], d_outs: list[torch.Tensor],
                      input_grad: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    if plan.stacks is not None:
        return plan.stacks[which].backward(saved, d_outs, input_grad)
    scales = plan.scales[:3] if which == 0 else plan.scales[3:]
    return projections_backward(saved, scales, ranks, d_outs, input_grad, plan.rate)


class _AttentionHalf(torch.autograd.Function):
    """``h + o_proj(attention(rope(q, k), v))`` with q/k/v the adapted projections of ``rms_norm(h)``."""

    @staticmethod
    def forward(ctx, h, cos, sin, plan, norm_weight, *weights):  # type: ignore[override]
        tokens, heads, kv_heads, dim = h.shape[1], plan.heads, plan.kv_heads, plan.head_dim
        x = h.view(tokens, -1)
        normed, r = rms_norm(x, norm_weight, plan.eps, plan.dtype)
        (q, k, v), saved_qkv = _project(plan, 0, normed, weights[:9])
        cos, sin = cos.reshape(tokens, dim), sin.reshape(tokens, dim)
        # stacked, q/k/v are column views of one product: RoPE's kernel and the gathers read rows
        q_rows = rope(q.contiguous().view(tokens, heads, dim), cos, sin).view(-1, dim)
        k_rows = rope(k.contiguous().view(tokens, kv_heads, dim), cos, sin).view(-1, dim)
        attended, saved_attention = _attention_forward(plan, q_rows, k_rows, v.reshape(-1, dim))
        (o,), saved_o = _project(plan, 1, attended.view(tokens, -1), weights[9:])
        ctx.plan = plan
        ctx.dtypes = [t.dtype for t in weights]
        ctx.row_dtypes = (k_rows.dtype, v.dtype)
        ctx.counts = (len(saved_qkv), len(saved_o))
        ctx.ranks = [a.shape[0] for a in weights[1::3]]  # q, k, v, o
        ctx.save_for_backward(x, r, norm_weight, cos, sin, *saved_qkv, *saved_o, *saved_attention)
        return (x + o).view(h.shape)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        plan = ctx.plan
        x, r, norm_weight, cos, sin, *rest = ctx.saved_tensors
        saved_qkv, saved_o = rest[: ctx.counts[0]], rest[ctx.counts[0] : sum(ctx.counts)]
        saved_attention = rest[sum(ctx.counts) :]
        tokens, dim = x.shape[0], plan.head_dim
        d = grad.reshape(tokens, -1)
        d_attended, o_grads = _project_backward(plan, 1, saved_o, ctx.ranks[3:], [d], True)
        k_dtype, v_dtype = ctx.row_dtypes
        d_k = x.new_zeros(tokens * plan.kv_heads, dim, dtype=k_dtype)
        d_v = x.new_zeros(tokens * plan.kv_heads, dim, dtype=v_dtype)
        d_q = _attention_backward(plan, saved_attention, d_attended.view(tokens, plan.heads, dim), d_k, d_v)
        d_q = rope_backward(d_q, cos, sin, plan.dtype).view(tokens, -1)
        d_k = rope_backward(d_k.view(tokens, plan.kv_heads, dim), cos, sin, plan.dtype).view(tokens, -1)
        d_normed, qkv_grads = _project_backward(plan, 0, saved_qkv, ctx.ranks[:3], [d_q, d_k, d_v.view(tokens, -1)], ctx.needs_input_grad[0])
        d_h = None
        if ctx.needs_input_grad[0]:
            d_h = rms_norm_backward(d_normed, x, r, norm_weight, d).view(grad.shape)
        adapter_grads = qkv_grads + o_grads
        per_weight = [g for d_down, d_up in zip(adapter_grads[0::2], adapter_grads[1::2]) for g in (None, d_down, d_up)]
        return (d_h, None, None, None, None, *(g.to(t) if g is not None and need else None
                                               for g, t, need in zip(per_weight, ctx.dtypes, ctx.needs_input_grad[5:])))


class _MlpHalf(torch.autograd.Function):
    """``h + mlp(rms_norm(h))`` with ``fused_mlp``'s products and backward (stacked where ``stacks``)."""

    @staticmethod
    def forward(ctx, h, settings, stacks, eps, norm_weight, *weights):  # type: ignore[override]
        x = h.reshape(-1, h.shape[-1])
        normed, r = rms_norm(x, norm_weight, eps, settings[1])
        out, saved = mlp_forward(normed, weights, settings) if stacks is None else stacked_mlp_forward(normed, stacks, settings[0])
        ctx.settings, ctx.stacks = settings, stacks
        ctx.dtypes = [t.dtype for t in weights]
        ctx.save_for_backward(x, r, norm_weight, *saved)
        return (x + out).view(h.shape)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, r, norm_weight, *saved = ctx.saved_tensors
        d = grad.reshape(x.shape)
        if ctx.stacks is None:
            d_normed, *adapter_grads = mlp_backward(tuple(saved), ctx.settings, d, ctx.needs_input_grad[0])
        else:
            d_normed, *adapter_grads = stacked_mlp_backward(tuple(saved), ctx.stacks, ctx.settings[0], d, ctx.needs_input_grad[0])
        d_h = rms_norm_backward(d_normed, x, r, norm_weight, d).view(grad.shape) if ctx.needs_input_grad[0] else None
        per_weight = [g for d_down, d_up in zip(adapter_grads[0::2], adapter_grads[1::2]) for g in (None, d_down, d_up)]
        return (d_h, None, None, None, None, *(g.to(t) if g is not None and need else None
                                               for g, t, need in zip(per_weight, ctx.dtypes, ctx.needs_input_grad[5:])))


def _weights(parts: list[LoraParts]) -> list[torch.Tensor]:
    return [t for p in parts for t in (p.weight, p.a, p.b)]


def _norm_eps(norm: nn.Module) -> float | None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    weight = getattr(norm, "weight", None)
    return float(eps) if isinstance(eps, float) and isinstance(weight, torch.Tensor) and not weight.requires_grad else None


class _FusedLayer:
    """A decoder layer's patched forward: the two fused halves when the call allows them, else the
    layer's own forward."""

    def __init__(self, layer: nn.Module, stack: bool = True) -> None:
        self.layer = layer
        self.stack = stack
        self.stacks: dict[str, tuple[ProjectionStack, ...]] = {}

    def _stacks(self, half: str, groups: list[list[LoraParts]], dtype: torch.dtype, rate: float) -> tuple[ProjectionStack, ...] | None:
        """The ``half``'s stacks (``"attention"``: q/k/v and o; ``"mlp"``: gate/up and down) for products in
        ``dtype``: made on the first call that can use them (the frozen weights in ``dtype``, no
        dropout), made again if the weights were re-homed."""
        if not self.stack or rate:
            return None
        held = self.stacks.get(half)
        if held is not None and all(stack.serves(group, dtype) for stack, group in zip(held, groups)):
            return held
        if not all(ProjectionStack.fits(group, dtype) for group in groups):
            return None
        held = self.stacks[half] = tuple(ProjectionStack(group) for group in groups)
        return held

    def release(self) -> None:
        """The frozen weights back in their own storage (``ProjectionStack.release``), one half at a
        time, each half's stacks dropped before the next half's weights are copied out."""
        for half in list(self.stacks):
            for stack in self.stacks.pop(half):
                stack.release()

    def _attention_parts(self) -> list[LoraParts] | None:
        parts = [lora_parts(getattr(self.layer.self_attn, name)) for name in ATTENTION]
        return parts if all(p is not None for p in parts) and fused_rate(parts) is not None else None  # type: ignore[arg-type]

    def _mlp_parts(self) -> list[LoraParts] | None:
        mlp = self.layer.mlp
        patch = vars(mlp).get("forward")
        if patch is not None and getattr(patch, "__func__", None) is not fused_forward:
            return None  # another patch (the last block's sliced MLP) decides what the MLP computes
        parts = [lora_parts(getattr(mlp, name)) for name in ("gate_proj", "up_proj", "down_proj")]
        return parts if all(p is not None for p in parts) and fused_rate(parts) is not None else None  # type: ignore[arg-type]

    def _plan(self, hidden: torch.Tensor, parts: list[LoraParts], kwargs: dict[str, Any]) -> _Attention | None:
        attention = self.layer.self_attn
        bounds = kwargs.get("cu_seq_lens_q")
        if (bounds is None or attention.config._attn_implementation != NAME or hidden.shape[0] != 1
                or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
                or kwargs.get("position_embeddings") is None or (attention.training and attention.attention_dropout)):
            return None
        prefix = kwargs.get("segment_prefix")
        bounds_list = bounds.tolist()
        if bounds_list[-1] != hidden.shape[1]:
            return None
        layout = layout_for(bounds_list, prefix.tolist() if prefix is not None else [-1] * (len(bounds_list) - 1), hidden.device)
        if not (layout.groups or layout.long):
            return None
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        q, k = parts[0].weight, parts[1].weight
        dim = attention.head_dim
        rate = fused_rate(parts)
        return _Attention(layout, q.shape[0] // dim, k.shape[0] // dim, dim, attention_scale(dim, attention.scaling),
                          _norm_eps(self.layer.input_layernorm), dtype, tuple(p.scale for p in parts), rate,  # type: ignore[arg-type]
                          self._stacks("attention", [parts[:3], parts[3:]], dtype, rate))  # type: ignore[arg-type]

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        parts = None if args or kwargs.get("attention_mask") is not None else self._attention_parts()
        plan = self._plan(hidden_states, parts, kwargs) if parts is not None else None
        if plan is None:
            return type(layer).forward(layer, hidden_states, *args, **kwargs)
        cos, sin = kwargs["position_embeddings"]
        with torch.autocast(hidden_states.device.type, enabled=False):  # the functions cast to ``plan.dtype`` themselves
            hidden = _AttentionHalf.apply(hidden_states, cos, sin, plan, layer.input_layernorm.weight, *_weights(parts))
        mlp_parts = self._mlp_parts()
        if mlp_parts is None:
            return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        rate = fused_rate(mlp_parts)
        settings = (ACTIVATIONS[type(layer.mlp.act_fn)], plan.dtype, tuple(p.scale for p in mlp_parts), rate)
        stacks = self._stacks("mlp", [mlp_parts[:2], mlp_parts[2:]], plan.dtype, rate)  # type: ignore[arg-type]
        with torch.autocast(hidden_states.device.type, enabled=False):
            return _MlpHalf.apply(hidden, settings, stacks, _norm_eps(layer.post_attention_layernorm), layer.post_attention_layernorm.weight, *_weights(mlp_parts))


def candidates(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of ``model`` shaped like a Llama block with every projection a LoRA layer
    ``lora_parts`` accepts and frozen RMS norms."""
    found = []
    for module in unwrap_peft(model).modules():
        attention, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        norms = [getattr(module, name, None) for name in ("input_layernorm", "post_attention_layernorm")]
        if attention is None or mlp is None or any(n is None or _norm_eps(n) is None for n in norms):
            continue
        projections = [getattr(attention, name, None) for name in ATTENTION] + [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if type(getattr(mlp, "act_fn", None)) not in ACTIVATIONS or not isinstance(getattr(attention, "head_dim", None), int):
            continue
        if all(p is not None and lora_parts(p) is not None for p in projections) and not any(
            m._forward_hooks or m._forward_pre_hooks for m in (module, attention, mlp, *norms)
        ):
            found.append(module)
    return found


def _computes_the_same(layer: nn.Module) -> bool:
    """Whether the fused halves equal ``layer``'s own forward on a probe packed row (fp32, no grad,
    eval): two examples, the second continuing the first as a shared prefix, and a padding segment."""
    weight = layer.input_layernorm.weight
    if weight.dtype != torch.float32:
        return False  # probed as loaded, before the trainer lowers the frozen weights' precision
    g = torch.Generator().manual_seed(0)
    dim = layer.self_attn.head_dim
    hidden = torch.randn(1, 9, weight.shape[0], generator=g).to(weight.device)
    angles = torch.randn(1, 9, dim // 2, generator=g).repeat(1, 1, 2).to(weight.device)
    kwargs = {"position_embeddings": (angles.cos(), angles.sin()), "position_ids": None,
              "cu_seq_lens_q": torch.tensor([0, 3, 7, 9], dtype=torch.int32, device=weight.device),
              "segment_prefix": torch.tensor([-1, 0, PADDING_SEGMENT], device=weight.device)}
    config = layer.self_attn.config
    previous, was_training = config._attn_implementation, layer.training
    config._attn_implementation = NAME
    layer.eval()
    try:
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):  # fp32, even when installed under autocast
            own = type(layer).forward(layer, hidden, **kwargs)
            probe = _FusedLayer(layer)
            fused = probe(hidden, **kwargs)
            probe.release()  # the frozen weights in their own storage again
    finally:
        config._attn_implementation = previous
        layer.train(was_training)
    real = slice(0, 7)  # the padding segment's output is never read
    own, fused = own[:, real], fused[:, real]
    return bool((own - fused).abs().max() <= PROBE_TOLERANCE * max(1.0, float(own.abs().max())))


@contextlib.contextmanager
def fused_blocks(model: nn.Module, stack: bool = True) -> Iterator[int]:
    """Run ``model``'s eligible decoder layers through the two fused halves while the context lasts;
    yields how many. One probe per distinct layer class decides whether its forward is the block
    these functions compute. ``stack``: their projections stacked where they can be
    (``stacked_projections``)."""
    verdicts: dict[type, bool] = {}
    patched = []
    for layer in candidates(model):
        if type(layer) not in verdicts:
            verdicts[type(layer)] = _computes_the_same(layer)
        if verdicts[type(layer)]:
            layer.forward = _FusedLayer(layer, stack)
            patched.append(layer)
    if patched:
        block_kernels()  # built (once per CPU) before the first step rather than inside it
    try:
        yield len(patched)
    finally:
        for layer in patched:
            layer.forward.release()
            del layer.forward
