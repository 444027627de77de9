"""RoPE's ``rotate_half`` with a backward of one ``cat`` instead of two whole-size zero tensors.

transformers' ``rotate_half`` (one copy per model family's modeling module) takes the two halves
of the last dimension by slicing. The backward of each slice allocates a zero tensor the size of
the whole input, copies the slice's gradient into it, and autograd then adds the two: for the
queries and the keys of every block. ``x.chunk(2, dim=-1)`` gives the same two views, and its
backward is one ``cat``. The values are the same to the bit, so swapping the function for the
duration of training (and for whatever else the process runs meanwhile) changes nothing but the
time: SmolLM2 LoRA forward + backward of the short benchmark workload's rows, 740 vs 758 ms
(bench/README.md, "Session 34"), losses bit-identical.

Swapped only where the model's own ``rotate_half`` is the half-split form this one computes,
checked on a probe input as ``fused_mlp`` checks its MLPs (an interleaved rotation keeps its own).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

from tunelab.methods.peft_adapters import unwrap_peft
from tunelab.train.distributed import unwrap as unwrap_ddp


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` of the two halves of the last dimension, as transformers' ``rotate_half``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _computes_the_same(theirs: object) -> bool:
    probe = torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(0))
    try:
        return bool(torch.equal(theirs(probe), rotate_half(probe)))  # type: ignore[operator]
    except Exception:  # noqa: BLE001 - a function of another signature is simply not ours to replace
        return False


@contextlib.contextmanager
def chunked_rotate_half(model: torch.nn.Module) -> Iterator[bool]:
    """Use ``rotate_half`` in ``model``'s modeling module while the context lasts; yields whether it did."""
    module = sys.modules.get(type(unwrap_peft(unwrap_ddp(model))).__module__)
    theirs = getattr(module, "rotate_half", None)
    if theirs is None or theirs is rotate_half or not callable(theirs) or not _computes_the_same(theirs):
        yield False  # absent, already swapped (another run in this process restores it), or another formula
        return
    module.rotate_half = rotate_half  # type: ignore[union-attr]
    try:
        yield True
    finally:
        module.rotate_half = theirs  # type: ignore[union-attr]
