"""The last decoder block's MLP computed only at the positions a loss reads.

A causal-LM loss over supervised tokens reads the model's last hidden state only at the positions
that predict one (``CausalLMObjective``'s sliced head). Every block but the last must run at every
position: later blocks' attention reads their keys and values. The last block's MLP, though, feeds
nothing but the final norm and the head, position by position, so at the other positions its
output is never read. On chat SFT rows that is most of them (the short benchmark workload: 16 of
~380 positions per step read), and the MLP is ~3/4 of a SmolLM2 block's matmul work, so computing
it only where it is read skips about 1/40 of a step's matmuls. At the skipped positions the block
outputs its attention's residual (the MLP's output taken as zero): a value no loss term reads.

Only where the loss reads at most half of the positions (``pays_to_slice``): on continued
pretraining or long answers it reads nearly all of them, and slicing then saves under 1/60 of a
step while costing more than that. The sliced row count changes every step, so oneDNN builds that
MLP's bf16 kernels anew each step (the long workload's seed 2 on the AMX Xeon: ~45 ms of kernel
building a step for its 119 of 128 rows, bench/README.md, "Session 38"), and the sliced MLP
runs outside the fused block's stacked projections.

Only for a gated MLP (``gate_proj``/``up_proj``/``down_proj`` with a SiLU or ReLU ``act_fn``, the
family ``tunelab.train.fused_mlp`` computes), whose output at a position depends on that position's
input alone; a mixture-of-experts layer (routing capacity, auxiliary outputs) keeps its forward.
The patch is held for as long as the objective's attention scope, which the trainer keeps over the
backward pass too: activation checkpointing re-runs the block's forward there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tunelab.methods.peft_adapters import unwrap_peft
from tunelab.train.distributed import unwrap as unwrap_ddp
from tunelab.train.fused_mlp import ACTIVATIONS


def last_gated_mlp(model: nn.Module) -> nn.Module | None:
    """The gated MLP of ``model``'s last decoder block (through DDP and peft wrappers), or None.

    None for a block compiled with ``torch.compile`` (``train.compile``): with the patch inside
    compiled SmolLM2 blocks in bf16, every call after the first computed a loss 1.3% below the
    eager one on the same batch and weights (0.9% with the patch itself kept eager), while the
    compiled blocks without it stay within 0.12% of eager (in fp32, with the patch, equal to 1e-7)."""
    inner = unwrap_peft(unwrap_ddp(model))
    decoder = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or getattr(layers[-1], "_compiled_call_impl", None) is not None:
        return None
    mlp = getattr(layers[-1], "mlp", None)
    gated = mlp is not None and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))
    return mlp if gated and type(getattr(mlp, "act_fn", None)) in ACTIVATIONS else None


def read_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: True at the positions whose next token carries loss (the ones a causal-LM loss
    reads): where the sliced head computes logits and the last block's MLP runs."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def pays_to_slice(keep: torch.Tensor) -> bool:
    """Whether computing the last MLP at ``keep``'s positions only is worth it: at most half of
    them are read (see the module docstring)."""
    return 2 * int(keep.sum()) <= keep.numel()


@contextlib.contextmanager
def mlp_at(mlp: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """Run ``mlp`` only at the ``True`` positions of ``keep`` (``[B, T]``) while the context lasts;
    its output elsewhere is zero. Calls of another shape, or with extra arguments, run it whole."""
    own = mlp.__dict__.get("forward")  # an instance patch already there (``fused_mlps``), kept under ours
    whole = mlp.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or x.shape[:-1] != keep.shape:
            return whole(x, *args, **kwargs)
        picked = whole(x[keep])
        return picked.new_zeros(*keep.shape, picked.shape[-1]).index_put((keep,), picked)

    mlp.forward = forward
    try:
        yield
    finally:
        if own is None:
            del mlp.forward
        else:
            mlp.forward = own
