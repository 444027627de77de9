"""Structured pruning that physically shrinks a Llama-style decoder and keeps its config true.

Removing MLP channels, attention head groups or whole blocks makes the matrices smaller, so the
model saves smaller, reloads with plain ``transformers`` (the config says the new sizes) and runs
faster. Config fields are global (one ``intermediate_size``, one head count), so every block
loses the same number of channels or heads; which ones each block loses is chosen by importance.

Importance is Wanda-style: a channel's outgoing weights times the norm of what flows through it
on calibration text (``‖W[:, j]‖₁ · ‖X_j‖₂`` at ``down_proj``/``o_proj``), or weight norms alone
without calibration. Blocks are ranked by ShortGPT's Block Influence.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunelab.compress import calibration
from tunelab.compress.masks import check_sparsity
from tunelab.errors import UserError
from tunelab.methods.blocks import drop_blocks

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-style model (Llama, Mistral, Qwen2, SmolLM...), or a user error."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(blocks, nn.ModuleList) or not all(
        all(hasattr(b.self_attn, p) for p in ATTENTION) and all(hasattr(b.mlp, p) for p in MLP) for b in blocks
    ):
        raise UserError(
            f"structured pruning supports Llama-style decoders (q/k/v/o_proj, gate/up/down_proj); got {type(model).__name__}",
            hint="use unstructured pruning (magnitude, wanda, taylor) for this architecture",
        )
    return blocks


def prune_mlp_channels(model: nn.Module, fraction: float, chunks: torch.Tensor | None = None) -> dict[str, int]:
    """Remove ``fraction`` of every block's MLP channels (the least important ones)."""
    check_sparsity(fraction)
    decoder_blocks(model)  # a clear error before any Llama-only config field is read
    width = model.config.intermediate_size
    keep_mlp_channels(model, rank_mlp_channels(model, width - math.floor(fraction * width + 0.5), chunks))
    return {"intermediate_size_before": width, "intermediate_size_after": model.config.intermediate_size}


def rank_mlp_channels(model: nn.Module, keep: int, chunks: torch.Tensor | None = None) -> list[list[int]]:
    """Per block, the ``keep`` most important MLP channels (ascending)."""
    blocks = decoder_blocks(model)
    norms = _norms_into(model, {i: b.mlp.down_proj for i, b in enumerate(blocks)}, chunks)
    return [
        (block.mlp.down_proj.weight.detach().abs().sum(0) * norms[i]).topk(keep).indices.sort().values.tolist()
        for i, block in enumerate(blocks)
    ]


def keep_mlp_channels(model: nn.Module, kept: list[list[int]]) -> None:
    """Shrink every block's MLP to its channels ``kept[block]`` (all blocks keep as many)."""
    for block, channels in zip(decoder_blocks(model), kept):
        index = torch.tensor(channels)
        block.mlp.gate_proj = _slice(block.mlp.gate_proj, index, dim=0)
        block.mlp.up_proj = _slice(block.mlp.up_proj, index, dim=0)
        block.mlp.down_proj = _slice(block.mlp.down_proj, index, dim=1)
        block.mlp.intermediate_size = len(channels)
    model.config.intermediate_size = len(kept[0])


def prune_heads(model: nn.Module, fraction: float, chunks: torch.Tensor | None = None) -> dict[str, int]:
    """Remove ``fraction`` of every block's key/value head groups (each with its query heads)."""
    check_sparsity(fraction)
    decoder_blocks(model)
    config = model.config
    kv_heads, heads = config.num_key_value_heads, config.num_attention_heads
    keep = kv_heads - math.floor(fraction * kv_heads + 0.5)
    if keep == kv_heads:
        raise UserError(f"head pruning of {fraction} removes no head group of {kv_heads}", hint=f"use at least {0.5 / kv_heads:.2f}")
    keep_head_groups(model, rank_head_groups(model, keep, chunks))
    return {"heads_before": heads, "heads_after": config.num_attention_heads}


def rank_head_groups(model: nn.Module, keep: int, chunks: torch.Tensor | None = None) -> list[list[int]]:
    """Per block, the ``keep`` most important key/value head groups (ascending)."""
    blocks = decoder_blocks(model)
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    norms = _norms_into(model, {i: b.self_attn.o_proj for i, b in enumerate(blocks)}, chunks)
    ranked = []
    for i, block in enumerate(blocks):
        column = block.self_attn.o_proj.weight.detach().abs().sum(0) * norms[i]
        ranked.append(column.view(config.num_key_value_heads, group * block.self_attn.head_dim).sum(1).topk(keep).indices.sort().values.tolist())
    return ranked


def keep_head_groups(model: nn.Module, kept: list[list[int]]) -> None:
    """Shrink every block's attention to its key/value head groups ``kept[block]`` and their query heads."""
    blocks = decoder_blocks(model)
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    head_dim = blocks[0].self_attn.head_dim
    for block, groups in zip(blocks, kept):
        attn, index = block.self_attn, torch.tensor(groups)
        kv_index = (index[:, None] * head_dim + torch.arange(head_dim)).flatten()
        q_index = ((index[:, None] * group + torch.arange(group))[..., None] * head_dim + torch.arange(head_dim)).flatten()
        attn.q_proj = _slice(attn.q_proj, q_index, dim=0)
        attn.k_proj = _slice(attn.k_proj, kv_index, dim=0)
        attn.v_proj = _slice(attn.v_proj, kv_index, dim=0)
        attn.o_proj = _slice(attn.o_proj, q_index, dim=1)
    config.head_dim = head_dim  # stays explicit: hidden_size // heads no longer gives it
    config.num_attention_heads = len(kept[0]) * group
    config.num_key_value_heads = len(kept[0])


def prune_blocks(model: nn.Module, fraction: float, chunks: torch.Tensor) -> dict[str, object]:
    """Remove ``fraction`` of the decoder blocks, those with the lowest Block Influence."""
    check_sparsity(fraction)
    if chunks is None:
        raise UserError("block pruning needs calibration text to rank blocks", hint="set compress.calibration to a text file")
    blocks = decoder_blocks(model)
    remove = math.floor(fraction * len(blocks) + 0.5)
    if remove == 0:
        raise UserError(f"block pruning of {fraction} removes no block of {len(blocks)}", hint=f"use at least {0.5 / len(blocks):.2f}")
    influence = calibration.block_influence(model, blocks, chunks)
    dropped = sorted(influence.topk(remove, largest=False).indices.tolist())
    kept = [i for i in range(len(blocks)) if i not in dropped]
    drop_blocks(model, kept)
    return {"blocks_before": len(blocks), "blocks_after": len(kept), "blocks_removed": dropped}


def _norms_into(model: nn.Module, layers: dict[int, nn.Linear], chunks: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Input-feature norms per layer from calibration, or ones (weights alone decide)."""
    if chunks is None:
        return {i: torch.ones(layer.in_features) for i, layer in layers.items()}
    named = {str(i): layer for i, layer in layers.items()}
    return {int(k): v for k, v in calibration.input_norms(model, named, chunks).items()}


def _slice(layer: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new, smaller Linear keeping ``index`` along ``dim`` (0: outputs, 1: inputs)."""
    weight = layer.weight.detach().index_select(dim, index)
    bias = layer.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, index)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new
