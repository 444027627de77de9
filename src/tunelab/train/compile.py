"""Regional ``torch.compile``: compile each transformer block, not the whole model.

On CPU, a LoRA step spends much of its time in elementwise ops between the matmuls (RMSNorm,
RoPE, SiLU·up, casts, the adapter's scale-and-add), each a full pass over memory. Inductor fuses
them into generated C++ loops. Compiling the blocks one by one (``Module.compile``) rather than
the whole model keeps the one-time cost to one block's graph: the blocks share their code, and
dynamo treats their parameters as inputs, so block 2..L reuse block 1's compiled code. Shapes are
marked dynamic because packed rows change length every step. Attention on packed rows
(``varlen_sdpa``) stays eager: its per-example loop depends on the data.
"""

from __future__ import annotations

import torch

from tunelab.methods.blocks import block_list


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile every transformer block of ``model`` in place; returns how many were compiled."""
    _, blocks = block_list(model)
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)
