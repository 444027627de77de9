"""Attention over packed rows without the packed row's quadratic cost.

A packed row of n examples with total length T is causal *within* each example only. Handed to
sdpa as one sequence with a block-diagonal ``[T, T]`` mask, every layer still computes all T²
scores and masks most of them away, and sdpa's fused CPU kernel is not used for arbitrary masks:
on short chat examples that made packing slower than padding (measured, bench/README.md). This
attention function runs sdpa once per example with ``is_causal=True`` instead: the cost is
Σ len², the fused kernel applies, and no token attends across an example boundary.

It is registered with transformers' ``AttentionInterface`` and used only inside
``varlen_attention(model)`` on packed batches; the example boundaries arrive as the
``cu_seq_lens_q`` keyword that transformers forwards from the model call to every attention layer
(the same contract its flash-attention varlen path uses). Because the function has no mask
counterpart, transformers skips building the ``[T, T]`` mask.

Short examples use sdpa's math kernel: torch's fused CPU flash-attention kernel has a high fixed
cost per call, most of it in backward. Measured in one process, alternating, one thread
(bench/README.md): on SmolLM2 chat examples of ~70 tokens the whole LoRA step was 14% faster with
the math kernel; on tiny-llama-20m byte-level examples of 150-190 tokens flash was 10% faster.
``MATH_BELOW`` sits between the two. The short segments of a row (every one whose keys, prefix
included, number fewer than ``MATH_BELOW``) go through a few padded attentions: queries and keys
gathered into ``[segments, heads, longest, dim]`` with a mask that lets each query see exactly its
own keys. Per call, not per FLOP, is what short segments cost: a SmolLM2 shared-prefix row (a
26-token prefix, 8 suffixes of 20-63 tokens) attends forward+backward in 9.4 ms with one padded
sdpa math call instead of 12-13 ms per-segment with the math kernel and 15-18 ms with flash
(2 threads, bf16). One call for all, though, pads every segment to the longest: segments of
similar widths share a call, and ``group_segments`` weighs a call's fixed cost against the
padding. The padded attention is written out (``_short_segments``: fp32 scores, the values'
product in the inputs' dtype), faster again than sdpa's math kernel, which does both products in
fp32 (flash with a mask: 2x slower than math). The layout is built once per row and
reused by every layer.

A row laid out with shared prefixes (``collate_packed(share_prefix=True)``) arrives with the
``segment_prefix`` keyword: for each segment, the index of the prefix segment it continues, or -1.
A prefix (or a whole example) is attended causally on its own; a suffix's queries attend to its
prefix's P keys and causally to their own (a bottom-right-aligned causal mask over ``P + len``
keys). Each token thus sees exactly the tokens it would see in its example alone, at the same
positions.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tunelab.data.collate import PADDING_SEGMENT
from tunelab.methods.peft_adapters import unwrap_peft

NAME = "tunelab_varlen_sdpa"
MATH_BELOW = 128  # tokens; see the module docstring


@dataclass(frozen=True)
class PaddedGroup:
    """Short segments attended by one padded call.

    ``query_index``/``key_index`` pick, for each segment, its ``longest`` queries and ``widest``
    keys (its prefix's, then its own; padding repeats token 0 and is masked out), ``hidden`` is
    True where a query must not see a key: each real query sees its prefix and causally its own
    keys, a padding query key 0 only (so no softmax row is empty); it is built once per row, so
    no layer makes its own copy. ``rows`` picks the real queries' outputs back out.
    """

    segments: int
    longest: int
    widest: int
    query_index: torch.Tensor
    key_index: torch.Tensor
    hidden: torch.Tensor
    rows: torch.Tensor
    #: the gathers and bias per (query heads, key/value heads, scores' dtype): see ``head_index``
    by_heads: dict[tuple[int, int, torch.dtype], _HeadIndex] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class RowLayout:
    """Where a packed row's segments go: the short ones into padded groups, the long ones alone.

    ``groups`` are the padded calls (``group_segments`` chooses them), ``long`` holds ``(start,
    end, prefix start, prefix end)`` for segments attended one by one, ``skipped`` the tokens of
    padding segments (``collate.PADDING_SEGMENT``), which no token attends to and whose outputs
    carry no loss: they are not attended (their output is zero) rather than widen a group.
    ``order`` (when the outputs do not come out in row order) puts them back.
    """

    groups: tuple[PaddedGroup, ...]
    long: tuple[tuple[int, int, int, int], ...]
    skipped: int
    order: torch.Tensor | None


#: What one more padded call costs, in query-key pairs per head: measured on SmolLM2 (9 heads,
#: bf16, 2 threads, forward + backward), a call's fixed cost is ~0.5 ms and a pair ~7 ns per head.
CALL_COST_PAIRS = 8192


def group_segments(shapes: list[tuple[int, int]]) -> list[list[int]]:
    """Split segments of ``(queries, keys)`` shapes into padded groups of least total cost.

    A group costs ``CALL_COST_PAIRS`` plus its padded area, segments x longest x widest: one
    group for all pads a row's 20-token examples to its one 121-token example (7.8 ms forward +
    backward on SmolLM2) where two groups take 2.4 ms. Segments sorted by keys, then the best
    split into consecutive runs by dynamic programming (a row holds tens of segments at most).
    """
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][1], shapes[i][0]))
    best = [0.0] + [float("inf")] * len(order)  # best[j]: least cost of the first j sorted segments
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        longest = 0
        for i in range(j - 1, -1, -1):  # the last group holds sorted segments i..j-1
            longest = max(longest, shapes[order[i]][0])
            cost = best[i] + CALL_COST_PAIRS + (j - i) * longest * shapes[order[j - 1]][1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def _padded_group(segments: list[tuple[int, int, int, int]], device: torch.device) -> PaddedGroup:
    """The padded call for ``segments`` (``(start, end, prefix start, prefix end)``)."""
    longest = max(e - s for s, e, _, _ in segments)
    widest = max(pe - ps + e - s for s, e, ps, pe in segments)
    query_index = torch.zeros(len(segments), longest, dtype=torch.long)
    key_index = torch.zeros(len(segments), widest, dtype=torch.long)
    mask = torch.zeros(len(segments), 1, longest, widest, dtype=torch.bool)
    mask[:, :, :, 0] = True  # padding queries see key 0; real ones are set below
    rows = []
    query, key = torch.arange(longest)[:, None], torch.arange(widest)[None, :]
    for i, (s, e, ps, pe) in enumerate(segments):
        length, prefix = e - s, pe - ps
        query_index[i, :length] = torch.arange(s, e)
        key_index[i, :prefix] = torch.arange(ps, pe)
        key_index[i, prefix : prefix + length] = torch.arange(s, e)
        real = query < length
        mask[i, 0] = torch.where(real, (key < prefix) | ((key >= prefix) & (key - prefix <= query)), mask[i, 0])
        rows.append(torch.arange(length) + i * longest)
    return PaddedGroup(len(segments), longest, widest, query_index.view(-1).to(device), key_index.view(-1).to(device),
                       (~mask[:, :, None]).to(device), torch.cat(rows).to(device))


def row_layout(bounds: list[int], prefix_of: list[int], device: torch.device) -> RowLayout:
    """The layout of a row whose segments end at ``bounds`` and continue the prefixes ``prefix_of``."""
    short: list[tuple[int, int, int, int]] = []
    long: list[tuple[int, int, int, int]] = []
    padding: list[tuple[int, int]] = []
    for segment, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        if prefix_of[segment] == PADDING_SEGMENT:
            padding.append((s, e))
            continue
        ps, pe = (bounds[prefix_of[segment]], bounds[prefix_of[segment] + 1]) if prefix_of[segment] >= 0 else (s, s)
        (short if pe - ps + e - s < MATH_BELOW else long).append((s, e, ps, pe))
    members = [[short[i] for i in group] for group in group_segments([(e - s, pe - ps + e - s) for s, e, ps, pe in short])]
    groups = tuple(_padded_group(group, device) for group in members)
    places = [torch.arange(s, e) for group in members for s, e, _, _ in group]
    places += [torch.arange(s, e) for s, e, _, _ in long] + [torch.arange(s, e) for s, e in padding]
    order = torch.empty(bounds[-1], dtype=torch.long)
    order[torch.cat(places)] = torch.arange(bounds[-1])
    in_row_order = bool(torch.equal(order, torch.arange(bounds[-1])))
    return RowLayout(groups, tuple(long), sum(e - s for s, e in padding), None if in_row_order else order.to(device))


_last_layout = threading.local()  # per thread (a process may train in several), the row being computed: every layer shares its layout


def layout_for(bounds: list[int], prefix_of: list[int], device: torch.device) -> RowLayout:
    key = (tuple(bounds), tuple(prefix_of), str(device))
    if getattr(_last_layout, "key", None) != key:
        _last_layout.key, _last_layout.layout = key, row_layout(bounds, prefix_of, device)
    return _last_layout.layout


class _HeadIndex(NamedTuple):
    """A padded group's gathers for one head count: flat row indices into the token-major ``[T ×
    heads, dim]`` queries and ``[T × key/value heads, dim]`` keys/values that land them directly
    in the padded batch's order, the padded outputs' rows back in ``[real tokens × heads]``
    order, and ``hidden`` as an additive bias. Built once per row: one ``index_select`` per tensor
    instead of a gather, a transpose and a reshape copy each."""

    queries: torch.Tensor
    keys: torch.Tensor
    outputs: torch.Tensor
    bias: torch.Tensor


def head_index(group: PaddedGroup, heads: int, kv_heads: int, dtype: torch.dtype) -> _HeadIndex:
    """The gathers and the ``[segments × kv heads, sharing × longest, widest]`` bias (-inf where
    hidden) for ``heads`` query heads sharing ``kv_heads`` key/value heads. Query heads sharing a
    key/value head are consecutive (transformers' ``repeat_kv``), so stacking them along the query
    axis is an order of the gather, not a copy of the keys."""
    key = (heads, kv_heads, dtype)
    if key not in group.by_heads:
        n, longest, widest, sharing = group.segments, group.longest, group.widest, heads // kv_heads
        device = group.hidden.device
        head, kv_head = torch.arange(heads, device=device), torch.arange(kv_heads, device=device)
        queries = group.query_index.view(n, 1, longest) * heads + head.view(1, heads, 1)  # (segment, head, query)
        keys = group.key_index.view(n, 1, widest) * kv_heads + kv_head.view(1, kv_heads, 1)  # (segment, kv head, key)
        segment, place = group.rows // longest, group.rows % longest
        outputs = (segment[:, None] * heads + head[None, :]) * longest + place[:, None]  # (token, head)
        bias = torch.zeros(group.hidden.shape, dtype=dtype, device=device).masked_fill_(group.hidden, float("-inf"))
        bias = bias.expand(n, kv_heads, sharing, longest, widest).reshape(n * kv_heads, sharing * longest, widest)
        group.by_heads[key] = _HeadIndex(queries.reshape(-1), keys.reshape(-1), outputs.reshape(-1), bias)
    return group.by_heads[key]


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """``[1, heads, T, dim]`` as ``[T × heads, dim]``: a view for a projection's output reshaped
    and transposed (how transformers lays out q/k/v), a copy otherwise. Taken once per layer, not
    per padded group, and by ``squeeze`` rather than ``x[0]``: the backward of a select allocates
    a zero tensor of the whole input and copies into it, once per call."""
    return x.squeeze(0).transpose(0, 1).reshape(-1, x.shape[3])


def _short_segments(group: PaddedGroup, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    heads: int, kv_heads: int, dropout: float, scaling: float | None) -> torch.Tensor:
    """One padded attention for a group of short segments: ``[tokens, heads, dim]`` in segment order,
    from the row's token-major ``[T × heads, dim]`` queries, keys and values (``_token_major``).

    Written out rather than sdpa's math kernel, which upcasts bf16 inputs to fp32 for both
    products. Here the scores are computed in fp32 (what sets the softmax's accuracy) by one
    ``baddbmm`` that also scales and masks (the bias), and the probabilities meet the values in
    the inputs' dtype, with fp32 accumulation inside the matmul: the same error as sdpa math
    against an fp64 reference, 1.6x faster forward+backward on a SmolLM2 row (bench/README.md,
    "Session 24"), and the bias with the direct gathers ~25% faster again ("Session 25").
    """
    with torch.autocast(query.device.type, enabled=False):  # the dtypes below are chosen, not autocast's
        index, q, k, v = gather_group(group, query, key, value, heads, kv_heads)
        scores = torch.baddbmm(index.bias, q, k.transpose(-1, -2), alpha=attention_scale(query.shape[1], scaling))
        probs = F.dropout(torch.softmax(scores, dim=-1), dropout) if dropout else torch.softmax(scores, dim=-1)
        out = torch.bmm(probs.to(value.dtype), v)
    return out.view(-1, out.shape[-1]).index_select(0, index.outputs).view(-1, heads, out.shape[-1])


def attention_scale(dim: int, scaling: float | None) -> float:
    """The scores' scale: the module's own, or sdpa's default ``dim ** -0.5``."""
    return dim**-0.5 if scaling is None else scaling


def gather_group(group: PaddedGroup, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 heads: int, kv_heads: int) -> tuple[_HeadIndex, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A padded group's gathers and its ``[segments × kv heads, sharing × longest, dim]`` queries and
    ``[segments × kv heads, widest, dim]`` keys (both in the scores' dtype, at least fp32) and values
    (their own dtype), from the row's token-major queries, keys and values."""
    index = head_index(group, heads, kv_heads, torch.promote_types(query.dtype, torch.float32))
    batch, rows, dim = group.segments * kv_heads, heads // kv_heads * group.longest, query.shape[1]
    q = query.index_select(0, index.queries).view(batch, rows, dim).to(index.bias.dtype)
    k = key.index_select(0, index.keys).view(batch, group.widest, dim).to(index.bias.dtype)
    v = value.index_select(0, index.keys).view(batch, group.widest, dim)
    return index, q, k, v


@torch.compiler.disable  # the per-example loop depends on the data; compiled blocks call it eagerly
def varlen_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Causal sdpa per segment of a ``[1, heads, T, dim]`` packed row; returns ``[1, T, heads, dim]``."""
    bounds = kwargs["cu_seq_lens_q"].tolist()  # type: ignore[union-attr]
    if not getattr(module, "is_causal", True) or query.shape[0] != 1 or query.shape[2] != bounds[-1]:
        # Not the packed row: a bidirectional tower inside the model (a VLM's vision encoder)
        # reached through the same config and handed the row's keywords; plain sdpa, as before
        # varlen_attention switched the implementation.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    segment_prefix = kwargs.get("segment_prefix")
    prefix_of = segment_prefix.tolist() if segment_prefix is not None else [-1] * (len(bounds) - 1)  # type: ignore[union-attr]
    layout = layout_for(bounds, prefix_of, query.device)
    p = dropout if module.training else 0.0
    gqa = key.shape[1] != query.shape[1]
    rows = [_token_major(t) for t in (query, key, value)] if layout.groups else []  # [T × heads, dim]
    parts = [_short_segments(group, *rows, query.shape[1], key.shape[1], p, scaling) for group in layout.groups]
    for s, e, ps, pe in layout.long:
        if pe > ps:  # a suffix: its own keys after its prefix's, bottom-right-aligned causal mask
            keys = torch.cat([key[:, :, ps:pe], key[:, :, s:e]], dim=2)
            values = torch.cat([value[:, :, ps:pe], value[:, :, s:e]], dim=2)
            sees = torch.ones(e - s, pe - ps + e - s, dtype=torch.bool, device=query.device).tril(diagonal=pe - ps)
            attended = F.scaled_dot_product_attention(query[:, :, s:e], keys, values, attn_mask=sees, dropout_p=p, scale=scaling, enable_gqa=gqa)
        else:
            attended = F.scaled_dot_product_attention(
                query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, dropout_p=p, scale=scaling, enable_gqa=gqa,
            )
        parts.append(attended[0].transpose(0, 1))
    if layout.skipped:
        parts.append(query.new_zeros(layout.skipped, query.shape[1], query.shape[3]))
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    if layout.order is not None:
        out = out.index_select(0, layout.order)
    return out.unsqueeze(0).contiguous(), None


AttentionInterface.register(NAME, varlen_sdpa)


def _transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP and PEFT wrappers."""
    return unwrap_peft(getattr(model, "module", model))


def supports_varlen(model: torch.nn.Module) -> bool:
    """Whether ``model`` runs sdpa through transformers' ``AttentionInterface``.

    ``varlen_sdpa`` is the per-example form of sdpa, so it replaces sdpa only: a model built with
    another kernel (``model.attn_implementation: eager``) keeps it, with the block-diagonal mask.
    """
    inner = _transformers_model(model)
    return bool(getattr(inner, "_supports_attention_backend", False)) and inner.config._attn_implementation == "sdpa"


def segment_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative example boundaries ``[0, len0, len0+len1, ..., T]`` of a ``[1, T]`` packed row
    whose positions restart at 0 for each example (a shared-prefix layout carries its own)."""
    restarts = position_ids[0] == 0
    starts = torch.nonzero(restarts).flatten()
    total = torch.tensor([position_ids.shape[1]], dtype=starts.dtype, device=starts.device)
    return torch.cat([starts, total]).to(torch.int32)


@contextlib.contextmanager
def varlen_attention(model: torch.nn.Module) -> Iterator[None]:
    """Route ``model``'s attention through ``varlen_sdpa`` for the duration of one call."""
    config = _transformers_model(model).config
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextlib.contextmanager
def standard_attention(model: torch.nn.Module) -> Iterator[None]:
    """Undo ``varlen_attention`` for a nested call that is not a packed row (a student generating
    inside its own training step); ``varlen_sdpa`` only ever replaces sdpa."""
    config = _transformers_model(model).config
    previous = config._attn_implementation
    if previous == NAME:
        config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = previous
