"""LoRA-adapted projections that read one input as two matmuls: frozen weights and adapter
down-projections stacked into one matrix, the up-projections block-diagonal in another.

``fused_projections`` computes q, k and v of an attention block (or one projection, o_proj, alone)
as one base product per projection, one down-product for all adapters and one up-product each:
for q/k/v, seven matmuls forward and eleven backward. On short rows each oneDNN bf16 call costs
~40-90 µs however small its product (a ``[112, 576] @ [576, 16]`` adapter product: 45 µs alone,
69-92 µs inside a step), so a step of a few hundred tokens is mostly call overhead (the long
workload's seed 2: ~114-token rows, 2,500 matmul calls a step; bench/README.md, "Session 38").
Stacked, the frozen weights ``W_i`` and the adapters' ``A_i`` are the rows of one ``[Σ out_i + Σ r_i,
in]`` matrix, so ``x`` meets all of them in one product whose last ``Σ r`` columns are the
adapters' rank-r inputs; the up-projections ``B_i`` sit on the diagonal of a ``[Σ out_i, Σ r_i]``
matrix (zeros elsewhere), so one ``addmm_`` adds every adapter's output. The backward is four
products: the rank-r gradient, the input's (``[d_out | d_low] @ stack``, one product for the frozen
and the adapter paths), and the A and B gradients. The same sums in a different order: the frozen
and adapter paths of the input gradient now meet in fp32 inside one matmul instead of being
rounded to bf16 between ``addmm_`` calls.

The frozen weights are held once: each is copied into the stack and its ``weight`` becomes a view
of its rows there (its own storage freed) for as long as the stack lives; ``release`` gives them
their own storage back. The adapters' rows and blocks are copied in at every forward (a few small
copies). A stack needs the frozen weights in the compute dtype (``frozen_precision``; an fp32 run
without autocast stacks fp32 when the weights are torch's own allocations, ``fits``), one scale
for all adapters, no adapter dropout (each adapter would read its own masked input), and every
frozen weight still the view it made (anything that re-homes one, such as
``frozen_precision.restore``, retires the stack).
"""

from __future__ import annotations

import torch

from tunelab.methods.peft_adapters import LoraParts


def _owns_its_storage(weight: torch.Tensor) -> bool:
    """Whether freeing ``weight``'s storage frees its memory: torch allocated it (resizable) and no
    other tensor's data shares it."""
    storage = weight.untyped_storage()
    return storage.resizable() and storage.nbytes() == weight.numel() * weight.element_size()


class ProjectionStack:
    """The stacked weights of LoRA projections that read one input (see the module docstring)."""

    def __init__(self, parts: list[LoraParts]) -> None:
        self.parts = parts
        self.outs = [p.weight.shape[0] for p in parts]
        self.ranks = [p.a.shape[0] for p in parts]
        self.width = sum(self.outs)
        self.scale = parts[0].scale
        dtype = self.dtype = parts[0].weight.dtype
        self.weight = torch.cat([p.weight.detach() for p in parts] + [p.a.detach().to(dtype) for p in parts])
        self.up = torch.zeros(self.width, sum(self.ranks), dtype=dtype, device=self.weight.device)
        for part, rows in zip(parts, self.weight[: self.width].split(self.outs)):
            part.weight.data = rows  # a view: the frozen weight lives in the stack
        self._pointers = [p.weight.data_ptr() for p in parts]

    @staticmethod
    def fits(parts: list[LoraParts], dtype: torch.dtype) -> bool:
        """Whether ``parts`` can be stacked for products in ``dtype``, and stacking them adds no
        memory: each frozen weight's storage is torch's own allocation and all its, so the stack
        replaces it. Weights whose memory belongs to something else (SmolLM2's fp32 weights as
        loaded from its GGUF, storage torch did not allocate) would stay beside their stacked copies:
        +410 MB of RSS for SmolLM2 in fp32. Weights cast by ``frozen_precision`` are always torch's."""
        first = parts[0].weight
        return all(p.weight.dtype == dtype and p.weight.device == first.device and p.weight.shape[1] == first.shape[1]
                   and p.weight.is_contiguous() and p.scale == parts[0].scale and p.dropout == 0
                   and _owns_its_storage(p.weight) for p in parts)

    def serves(self, parts: list[LoraParts], dtype: torch.dtype) -> bool:
        """Whether this stack computes ``parts`` in ``dtype`` on this call: its views still the frozen
        weights, its dtype, one scale, no dropout (``fits`` no longer holds once a stack exists:
        the weights are its views)."""
        return dtype == self.dtype and self.current() and all(p.dropout == 0 and p.scale == self.scale for p in parts)

    def current(self) -> bool:
        """Whether every frozen weight is still the view of the stack this made."""
        return all(p.weight.data_ptr() == ptr and p.weight.dtype == self.dtype for p, ptr in zip(self.parts, self._pointers))

    def refresh(self) -> None:
        """Copy the adapters' A rows and B blocks in (each forward: the optimizer's fused kernels
        update parameters without bumping their version counters, so a change cannot be detected
        cheaply; the copies are ~14 small ones per block)."""
        with torch.no_grad():
            row = self.width
            for part, rank in zip(self.parts, self.ranks):
                self.weight[row : row + rank].copy_(part.a)
                row += rank
            row = column = 0
            for part, out, rank in zip(self.parts, self.outs, self.ranks):
                self.up[row : row + out, column : column + rank].copy_(part.b)
                row, column = row + out, column + rank

    def release(self) -> None:
        """Give each frozen weight that is still a view of the stack its own storage back."""
        for part, ptr in zip(self.parts, self._pointers):
            if part.weight.data_ptr() == ptr:
                part.weight.data = part.weight.data.clone()

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``[x W_iᵀ + s (x A_iᵀ) B_iᵀ]`` for the ``[tokens, in]`` input ``x`` (in the stack's dtype), as
        column views of one ``[tokens, Σ out + Σ r]`` product, and what ``backward`` needs."""
        self.refresh()
        y = x @ self.weight.t()
        low = y[:, self.width :].contiguous()  # saved on its own: the outputs' columns can be freed
        y[:, : self.width].addmm_(low, self.up.t(), alpha=self.scale)
        return list(y[:, : self.width].split(self.outs, dim=1)), (x, low)

    def gradient_buffer(self, tokens: int) -> torch.Tensor:
        """An empty ``[tokens, Σ out + Σ r]`` matrix: the outputs' gradients go in its first ``Σ out``
        columns (``input_gradient`` fills the rest), so one product gives the input's gradient."""
        return self.weight.new_empty(tokens, self.weight.shape[0])

    def input_gradient(self, d: torch.Tensor, input_grad: bool) -> torch.Tensor | None:
        """Fill ``d``'s rank-r columns from its output columns and return the input's gradient
        (None unless ``input_grad``)."""
        d[:, self.width :].copy_(d[:, : self.width] @ self.up).mul_(self.scale)
        return d @ self.weight if input_grad else None

    def adapter_grads(self, x: torch.Tensor, low: torch.Tensor, d: torch.Tensor) -> list[torch.Tensor]:
        """``[d_A_0, d_B_0, d_A_1, ...]`` in the stack's dtype, from the input ``x``, the saved rank-r
        products ``low`` and the filled gradient matrix ``d``."""
        d_up = low.t() @ d[:, : self.width]  # [Σ r, Σ out]: each adapter's block on the diagonal, transposed
        d_downs = (d[:, self.width :].t() @ x).split(self.ranks)
        grads, row, column = [], 0, 0
        for d_down, out, rank in zip(d_downs, self.outs, self.ranks):
            grads += [d_down, d_up[row : row + rank, column : column + out].t() * self.scale]
            row, column = row + rank, column + out
        return grads

    def backward(self, saved: tuple[torch.Tensor, torch.Tensor], d_outs: list[torch.Tensor],
                 input_grad: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The input's gradient (None unless ``input_grad``) and ``[d_A_0, d_B_0, d_A_1, ...]`` in the
        stack's dtype from the outputs' gradients."""
        x, low = saved
        d = self.gradient_buffer(x.shape[0])
        start = 0
        for grad, out in zip(d_outs, self.outs):
            d[:, start : start + out].copy_(grad.reshape(x.shape[0], out))
            start += out
        d_x = self.input_gradient(d, input_grad)
        return d_x, self.adapter_grads(x, low, d)
