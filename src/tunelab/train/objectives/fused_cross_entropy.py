"""LM head + cross-entropy in row chunks, never holding the ``[tokens, vocab]`` logits.

When every token is supervised (continued pretraining, long answers) the plain path materialises
the logits of all N positions over the whole vocabulary (SmolLM2: 49,152 classes, 197 kB per token
in fp32) and then several same-sized tensors around them: the fp32 copy, the log-softmax, and the
gradient in the backward pass. Here each chunk of rows computes its logits, its loss and, when a
gradient will be needed, its gradient with respect to the hidden states (and the head weight, if
that trains) right away, in the forward pass, so only one chunk's logits ever exist. The backward
pass then only scales the stored gradients by the incoming scalar. This is the scheme of Liger
Kernel's fused linear cross-entropy and of Wijmans et al. 2024 ("Cut your losses"), written with
plain matmuls: the FLOPs equal the unfused path's, the memory is N x width instead of N x vocab.

The loss is returned **summed** over tokens (optionally weighted per token), which is what the
trainer's objectives return; the gradient is exact for any scalar that is a multiple of that sum.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

#: Rows per chunk: 512 x 49k fp32 logits = 100 MB transient. Measured on SmolLM2's head (2048 tokens,
#: AVX2 EPYC, fp32): 512 rows as fast as 1024 at half the memory (287 vs 575 MB); 256 rows 5% slower.
DEFAULT_CHUNK_ROWS = 512


@contextlib.contextmanager
def reused_buffers() -> Iterator[None]:
    """Keep the chunks' ``[rows, vocab]`` buffers from one call to the next while inside.

    Why: glibc maps every allocation above 32 MB fresh from the OS and unmaps it when freed, so
    a new tensor that size page-faults on each 4 kB it writes, every time; the fp32 scores of
    230 positions over SmolLM2's vocabulary are 45 MB: its ``.float()`` took 13 ms fresh and 1 ms
    in a kept buffer (AVX-512 BF16 EPYC). With ``_chunk_loss``'s fewer passes the work around
    the head's matmul fell from 46 ms to 10 ms for 230 rows (bench/README.md, session 33). The
    trainer holds this over ``fit``; outside it each call allocates its own, so nothing is kept
    once training ends. Per thread: a process training in several threads keeps one set each.
    """
    outer = _held()
    _local.buffers = {} if outer is None else outer
    try:
        yield
    finally:
        _local.buffers = outer


_local = threading.local()


def _held() -> dict[tuple[str, torch.dtype, torch.device], torch.Tensor] | None:
    """This thread's kept buffers; None outside ``reused_buffers``."""
    return getattr(_local, "buffers", None)


#: Kept buffers grow in steps of this many rows, so a run's varying row counts reallocate rarely.
ROW_STEP = 64


def _buffer(name: str, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[rows, vocab]`` tensor to overwrite: a kept one inside ``reused_buffers``, else new."""
    buffers = _held()
    if buffers is None:
        return torch.empty(rows, vocab, dtype=dtype, device=device)
    key = (name, dtype, device)
    held = buffers.get(key)
    if held is None or held.shape[0] < rows or held.shape[1] != vocab:
        buffers.pop(key, None)  # freed before its successor exists
        held = buffers[key] = torch.empty(-(-rows // ROW_STEP) * ROW_STEP, vocab, dtype=dtype, device=device)
    return held[:rows]


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's per-row loss, its softmax (fp32, to be turned into the logits' gradient in
    place), its argmax hits and the ``dtype`` buffer the logits were computed in (free to reuse).

    Four passes over the ``[rows, vocab]`` scores besides the two matmuls: the fp32 copy, its
    maximum, the softmax (one fused kernel) and the probabilities' maximum. The log-normaliser
    comes from the last, ``log Σ exp(s - max) = -log p_max``, so no ``logsumexp`` temporary is
    made, and the argmax is taken only on the rows whose target reaches the maximum: a row is a
    hit exactly when its target is the *first* maximal class, which only such rows can have.
    """
    rows, vocab, device = hidden.shape[0], weight.shape[0], hidden.device
    logits = _buffer("logits", rows, vocab, dtype, device)
    with torch.autocast(device.type, enabled=False):  # the dtypes are chosen: autocast's, or the weight's
        torch.mm(hidden.to(dtype), weight.to(dtype).t(), out=logits)
    scores = logits if dtype == torch.float32 else _buffer("scores", rows, vocab, torch.float32, device).copy_(logits)
    top = scores.amax(-1)
    target_scores = scores.gather(1, targets[:, None]).squeeze(1)
    at_top = torch.nonzero(target_scores == top).squeeze(1)
    hits = (scores[at_top].argmax(-1) == targets[at_top]).sum()
    probabilities = torch.ops.aten._softmax.out(scores, -1, False, out=_buffer("probabilities", rows, vocab, torch.float32, device))
    loss = top - probabilities.amax(-1).log() - target_scores
    return loss, probabilities, hits, logits


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor | None, rows: slice,
           dtype: torch.dtype, grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows``: their summed (weighted) loss and argmax hits; their gradients written into
    ``grad_hidden[rows]`` and added into ``grad_weight`` when those are asked for."""
    h, t = hidden[rows], targets[rows]
    loss, grad_logits, hits, spare = _chunk_loss(h, weight, t, dtype)
    w = None if token_weights is None else token_weights[rows].float()
    loss_sum = loss.sum() if w is None else (loss * w).sum()
    if grad_hidden is None and grad_weight is None:
        return loss_sum, hits
    # d(sum_i w_i * loss_i)/d logits_i = w_i * (softmax_i - onehot(t_i))
    grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1
    if w is not None:
        grad_logits.mul_(w[:, None])
    if grad_logits.dtype != dtype:
        grad_logits = spare.copy_(grad_logits)  # the logits' buffer, read by nothing since the fp32 copy
    if grad_hidden is not None:
        grad_hidden[rows] = (grad_logits @ weight.to(dtype)).to(hidden.dtype)
    if grad_weight is not None:
        grad_weight += (grad_logits.T @ h.to(dtype)).float()
    return loss_sum, hits


def _matmul_dtype(weight: torch.Tensor) -> torch.dtype:
    """The gradient matmuls run in the precision the forward's ``F.linear`` ran in: autocast's
    when it is on (as the unfused backward would), else the weight's."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the summed loss and both gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, chunk_rows):  # type: ignore[override]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        dtype = _matmul_dtype(weight)
        for start in range(0, hidden.shape[0], chunk_rows):
            # one call per chunk: its [rows, vocab] tensors are freed before the next chunk's exist
            loss_sum, hits = _chunk(hidden, weight, targets, token_weights, slice(start, start + chunk_rows), dtype, grad_hidden, grad_weight)
            total += loss_sum
            correct += hits
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_correct):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total.float()
        grad_h = None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype)
        grad_w = None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i w_i * CE(hidden_i @ weight.T, targets_i), number of argmax hits)``.

    ``hidden``: [N, width]; ``weight``: the LM head's [vocab, width]; ``targets``: [N] class ids;
    ``token_weights``: optional [N]. Equal (to float rounding) to
    ``F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")`` weighted and
    summed, with the same gradients.
    """
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, token_weights, chunk_rows)
