"""Store frozen weights in the autocast dtype while training.

Under bf16 autocast every matmul reads its weight in bf16 anyway, but a frozen fp32 weight is not
in autocast's cast cache (it caches only leaves that require grad), so it is converted again on
every forward, and the activations between layers stay fp32, so each adapted linear layer casts
its input again for the base weight and for each adapter. Holding the frozen weights in bf16
removes those conversions and halves the frozen weights' memory. Matmul numerics are unchanged
(the same bf16 operands). Trainable weights (adapters, heads, unfrozen blocks) stay fp32, so the
optimizer updates full-precision masters.

The residual stream stays fp32, as under plain autocast: the bf16 embedding table's output is
widened on the way out. Left in bf16 (the embedding's dtype), the stream was rounded after every
layer's residual add, and the loss came out biased: over 40 batches of the benchmark's short
workload at the initial weights, -0.88% against fp32 (sd 0.53%), where the Trainer's autocast
gives +0.19% (sd 0.40%) and the fp32 stream +0.09% (sd 0.38%) (bench/README.md, "Session 26").

With the activations in bf16, peft's habit of casting an adapter's input to the adapter's weight
dtype becomes pure waste: it copies each bf16 activation to fp32, and autocast copies it straight
back to bf16 for the adapter's matmul (the round trip is exact, so the values are the same).
Switching that cast off (peft's own ``cast_input_dtype_enabled``) for the duration of training
saves two activation copies per adapted layer: 1.14x per SmolLM2 LoRA step
(``bench/adapter_input_cast.py``), with bit-identical losses and gradients when the adapter has
no dropout. With LoRA dropout ``p`` the dropout now runs on the bf16 input, whose kernel keeps
``1/(1-p)`` in bf16 (1.0547 for 1.0526 at p = 0.05): a 0.2% scale on the adapter's input, well
inside what bf16 autocast already rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tunelab.hardware import release_free_memory


@dataclass
class FrozenCast:
    """What :func:`cast_frozen` changed, so :func:`restore` can undo it."""

    dtypes: dict[torch.nn.Parameter, torch.dtype] = field(default_factory=dict)
    adapter_layers: list[torch.nn.Module] = field(default_factory=list)
    hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)


def _widen_output(_module: torch.nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
    return output.float() if output.is_floating_point() else output


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> FrozenCast:
    """Convert every frozen floating-point parameter to ``dtype``, stop peft's adapter-input casts, and
    keep the residual stream fp32 (the input embedding's output widened)."""
    changed = FrozenCast()
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            changed.dtypes[param] = param.dtype
            param.data = param.data.to(dtype)
    for module in model.modules():
        if hasattr(module, "_cast_input_dtype") and getattr(module, "cast_input_dtype_enabled", True):
            module.cast_input_dtype_enabled = False
            changed.adapter_layers.append(module)
    embedding = _input_embedding(model)
    if embedding is not None and embedding.weight in changed.dtypes:
        changed.hooks.append(embedding.register_forward_hook(_widen_output))
    return changed


def _input_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if get is not None else None
    except NotImplementedError:
        return None
    return embedding if isinstance(embedding, torch.nn.Embedding) else None


def restore(changed: FrozenCast) -> None:
    """Give the frozen weights their dtype back (values keep the rounding they trained with).

    The wider copies are allocated after the heap's free pages go back to the OS: otherwise they
    land on top of everything training left free, and the end of training became the run's
    memory peak (+160-300 MB for SmolLM2)."""
    if changed.dtypes:
        release_free_memory()
    for param, dtype in changed.dtypes.items():
        param.data = param.data.to(dtype)
    for module in changed.adapter_layers:
        module.cast_input_dtype_enabled = True
    for hook in changed.hooks:
        hook.remove()
