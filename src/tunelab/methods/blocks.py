"""Finding the transformer blocks and their sub-layers in any Hugging Face architecture.

Freezing "the first N blocks", adding adapters "after attention" or layer-wise learning rates
all need to know which modules are the blocks, in depth order. Rather than a table per model
class we take the longest ``nn.ModuleList`` (that is the block stack in Llama, BERT, BLOOM, GPT-2,
Qwen, Gemma, ...) and name known sub-layer paths.
"""

from __future__ import annotations

import re

import torch

#: Output projection of the attention sub-layer, per family (Llama-like, BERT, BLOOM, GPT-2).
ATTENTION_OUTPUT = ("self_attn.o_proj", "attention.output.dense", "self_attention.dense", "attn.c_proj")
#: Output projection of the feed-forward sub-layer.
MLP_OUTPUT = ("mlp.down_proj", "output.dense", "mlp.dense_4h_to_h", "mlp.c_proj")


def block_list(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The stack of transformer blocks: (qualified name, ModuleList)."""
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no ModuleList of blocks")
    return max(candidates, key=lambda item: (len(item[1]), -item[0].count(".")))


def block_index(parameter_name: str, blocks_name: str) -> int | None:
    """Which block a parameter belongs to (None for embeddings, final norm, heads)."""
    match = re.search(re.escape(blocks_name) + r"\.(\d+)\.", parameter_name)
    return int(match.group(1)) if match else None


def sublayer(block: torch.nn.Module, candidates: tuple[str, ...]) -> torch.nn.Module | None:
    """The first of ``candidates`` (dotted paths) that exists inside ``block``."""
    for path in candidates:
        try:
            return block.get_submodule(path)
        except AttributeError:
            continue
    return None


def drop_blocks(model: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """Keep only blocks ``keep`` of ``model`` (in place), renumbering what indexes blocks: the
    attention layers' ``layer_idx`` (the KV cache slot) and per-layer config lists."""
    name, blocks = block_list(model)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    kept = torch.nn.ModuleList(blocks[i] for i in keep)
    setattr(parent, name.rsplit(".", 1)[-1], kept)
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, len(keep))
    for key in ("layer_types",):  # per-block settings (sliding or full attention) follow their blocks
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == len(blocks):
            setattr(config, key, [values[i] for i in keep])
    return model
