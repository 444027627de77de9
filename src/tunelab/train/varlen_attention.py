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
``MATH_BELOW`` sits between the two.

A row laid out with shared prefixes (``collate_packed(share_prefix=True)``) arrives with the
``segment_prefix`` keyword: for each segment, the index of the prefix segment it continues, or -1.
A prefix (or a whole example) is attended causally on its own; a suffix's queries attend to its
prefix's P keys and causally to their own (a bottom-right-aligned causal mask over ``P + len``
keys). Each token thus sees exactly the tokens it would see in its example alone, at the same
positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface

from tunelab.methods.peft_adapters import unwrap_peft

NAME = "tunelab_varlen_sdpa"
MATH_BELOW = 128  # tokens; see the module docstring


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
    segment_prefix = kwargs.get("segment_prefix")
    prefix_of = segment_prefix.tolist() if segment_prefix is not None else [-1] * (len(bounds) - 1)  # type: ignore[union-attr]
    p = dropout if module.training else 0.0
    gqa = key.shape[1] != query.shape[1]
    parts = []
    for segment, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        if prefix_of[segment] >= 0:  # a suffix: its own keys after its prefix's
            ps, pe = bounds[prefix_of[segment]], bounds[prefix_of[segment] + 1]
            keys = torch.cat([key[:, :, ps:pe], key[:, :, s:e]], dim=2)
            values = torch.cat([value[:, :, ps:pe], value[:, :, s:e]], dim=2)
            sees = torch.ones(e - s, pe - ps + e - s, dtype=torch.bool, device=query.device).tril(diagonal=pe - ps)
            parts.append(F.scaled_dot_product_attention(
                query[:, :, s:e], keys, values, attn_mask=sees, dropout_p=p, scale=scaling, enable_gqa=gqa,
            ))
            continue
        kernel = sdpa_kernel(SDPBackend.MATH) if e - s < MATH_BELOW else contextlib.nullcontext()
        with kernel:
            parts.append(F.scaled_dot_product_attention(
                query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, dropout_p=p, scale=scaling, enable_gqa=gqa,
            ))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


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
    total = torch.tensor([position_ids.shape[1]], dtype=starts.dtype)
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
