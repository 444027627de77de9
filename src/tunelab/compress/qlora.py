"""QLoRA's base model: the frozen weights in bitsandbytes NF4, ready for LoRA adapters on top.

Dettmers et al. 2023: keep the base in 4-bit NormalFloat and train only LoRA adapters in full
precision; gradients flow through the dequantized base. On CPU bitsandbytes computes in fp32
(``compute_dtype=float32``), which saves memory, not time (FACTS.md).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from tunelab.compress.quantize import quantize


def nf4_base(model: nn.Module, keep: Iterable[str] = ()) -> nn.Module:
    """``model`` with every linear except the output head and ``keep`` in NF4, frozen, for peft LoRA."""
    from peft import prepare_model_for_kbit_training

    model, _ = quantize(model, "nf4", keep=keep)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
