"""Memory of the LM head and the loss: the largest temporaries of a step on large vocabularies.

The engine has two paths (``train/objectives/causal_lm.py``). The fused path computes the head
and the cross-entropy in chunks of ``CHUNK_ROWS`` supervised positions inside the forward pass,
storing the gradients it will hand back (with respect to the hidden states, and to the head's
weight when it trains): one chunk's ``[rows, vocab]`` buffers exist at a time, the logits in the
matmul's dtype, their fp32 copy under autocast, and the fp32 softmax (the trainer keeps them
from step to step, sized to the largest chunk seen, rounded up to 64 rows). The logits path
(under FSDP, whose sharded head is whole only inside the model's forward) computes ``[supervised, vocab]`` logits in the model,
upcasts them to fp32 and keeps the log-softmax for the backward, which then allocates two more
fp32 tensors of that size (the gradients of the loss and of the log-softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.plan.architecture import Architecture

#: Rows per chunk of the fused loss (``tunelab.train.objectives.fused_cross_entropy.DEFAULT_CHUNK_ROWS``;
#: a test keeps the two equal).
CHUNK_ROWS = 512
#: The kept buffers' row rounding (``fused_cross_entropy.ROW_STEP``; the same test).
ROW_STEP = 64


@dataclass(frozen=True)
class LossMemory:
    """Bytes of the head + loss at the three moments of a step that can hold the peak."""

    saved: float  # kept from the forward until the backward reaches the loss
    forward_transient: float  # extra, at the loss's own peak inside the forward
    backward_transient: float  # extra, when the backward starts at the loss


def loss_memory(
    arch: Architecture, *, supervised: int, fused: bool, head_trains: bool, hidden_requires_grad: bool,
    autocast: bool, compute_bytes: int, residual_bytes: int, head_weight_bytes: int,
) -> LossMemory:
    """``supervised`` positions of one micro-batch through the head and the loss."""
    V, h = arch.vocab, arch.hidden
    index = 8 * supervised if hidden_requires_grad else 0  # the positions picked (int64), for the gather's backward
    # Under autocast a trainable head's weight is cast once for the model's own head call (the
    # fused path asks it for the logits of no position) and that copy is kept for its backward.
    head_copy = compute_bytes * V * h if autocast and head_trains else 0
    picked = residual_bytes * h * supervised  # the hidden states at those positions, copied out
    if fused:
        rows = min(CHUNK_ROWS, supervised)
        grad_hidden = residual_bytes * h * supervised if hidden_requires_grad else 0
        grad_weight = 4 * V * h if head_trains else 0  # fp32, accumulated chunk by chunk
        rows = -(-rows // ROW_STEP) * ROW_STEP  # the buffers the trainer keeps
        # A chunk's logits (fp32 without autocast), their fp32 scores under autocast, the fp32
        # softmax, and with a trainable head the product added into grad_weight.
        inside = (compute_bytes if autocast else 4) * rows * V + (4 * rows * V if autocast else 0) + 4 * rows * V + (4 * V * h if head_trains else 0)
        casts = 2 * compute_bytes * V * h if autocast and head_weight_bytes != compute_bytes else 0
        return LossMemory(
            saved=index + grad_hidden + grad_weight + head_copy,
            forward_transient=picked + inside + casts,
            backward_transient=4 * V * h if head_trains else 0,  # the scaled weight gradient handed back
        )
    logits = supervised * V
    head_input = (compute_bytes if autocast else residual_bytes) * h * supervised if head_trains else 0
    return LossMemory(
        saved=index + head_input + head_copy + 4 * logits,  # the fp32 log-softmax
        forward_transient=picked + compute_bytes * logits + (4 * logits if autocast else 0),
        backward_transient=8 * logits,  # the loss's and the log-softmax's gradients
    )
