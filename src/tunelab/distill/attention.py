"""Reading a model's attention inputs for attention transfer: the query, key and value projections
of chosen blocks, captured by forward hooks while one forward pass runs.

Hooks on the projections (not ``output_attentions``) work with every attention kernel (sdpa,
per-example varlen on packed rows, eager) and cost no extra matmul: the relations are computed
from the captured projections afterwards. A LoRA-wrapped projection is captured with its adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tunelab.errors import UserError
from tunelab.methods.blocks import block_list, sublayer
from tunelab.methods.peft_adapters import unwrap_peft

#: Query, key and value projections per family (Llama-like decoders, BERT encoders).
PROJECTIONS = {
    "q": ("self_attn.q_proj", "attention.self.query"),
    "k": ("self_attn.k_proj", "attention.self.key"),
    "v": ("self_attn.v_proj", "attention.self.value"),
}


def head_counts(model: torch.nn.Module) -> tuple[int, int]:
    """``(query heads, key/value heads)`` from the model's config."""
    config = unwrap_peft(model).config
    heads = int(config.num_attention_heads)
    return heads, int(getattr(config, "num_key_value_heads", None) or heads)


def projections(model: torch.nn.Module, block: int) -> dict[str, torch.nn.Module]:
    """The q/k/v projection modules of block ``block`` (1-based, as hint layers count), or a clear
    error for architectures with fused projections."""
    _, blocks = block_list(model)
    found = {kind: sublayer(blocks[block - 1], paths) for kind, paths in PROJECTIONS.items()}
    if any(module is None for module in found.values()):
        raise UserError(
            f"attention transfer needs separate query/key/value projections; {type(unwrap_peft(model)).__name__} has none it recognises",
            where="objective.name", hint="use kd_logits or kd_hints for this architecture",
        )
    return found  # type: ignore[return-value]


@contextlib.contextmanager
def captured(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """While the context lasts, every forward of ``modules`` stores its output under its name."""
    store: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_hook(_keeper(store, name)) for name, module in modules.items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _keeper(store: dict[str, torch.Tensor], name: str):
    def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
        store[name] = output

    return hook
