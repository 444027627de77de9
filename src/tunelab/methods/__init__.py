"""Methods: what is trained. Each is a plug-in that prepares the model; they compose.

``apply_methods`` runs them in a fixed order: dropout overrides, freezing, the task head's base
policy, bottleneck adapters, a PEFT adapter family. The last step re-marks the parameters that
must train whatever an earlier step froze (added adapters, the task head), because peft freezes
everything it did not create.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.methods.bottleneck import apply_bottleneck
from tunelab.methods.config import MethodConfig
from tunelab.methods.dropout import apply_dropout
from tunelab.methods.freeze import apply_freeze
from tunelab.methods.peft_adapters import apply_peft

HEAD_MODULES = ("score", "classifier")

#: peft's task type per model task: it decides which forward signature the wrapper exposes and
#: which head modules stay trainable; masked LM has none and takes the plain wrapper.
PEFT_TASK_TYPES = {
    "causal-lm": "CAUSAL_LM",
    "sequence-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
    "base": "FEATURE_EXTRACTION",
}


@dataclass(frozen=True)
class TrainableSummary:
    """How much of the model trains (printed at start and kept in the run summary)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} / {self.total:,} ({self.percent:.3f}%)"


def apply_methods(model: torch.nn.Module, cfg: MethodConfig, *, task: str, tokenizer_dir: str | None = None) -> torch.nn.Module:
    """Prepare ``model`` for training as ``cfg`` says; ``task`` is "causal-lm" or "sequence-classification"."""
    if cfg.dropout:
        apply_dropout(model, cfg.dropout)
    if cfg.freeze:
        apply_freeze(model, cfg.freeze)
    if cfg.head and cfg.head.base == "frozen":
        for param in model.parameters():
            param.requires_grad_(False)
    if cfg.bottleneck:
        apply_bottleneck(model, cfg.bottleneck)
    if cfg.lora and cfg.lora.qlora:
        from tunelab.compress.qlora import nf4_base

        model = nf4_base(model)
    if cfg.peft_family():
        model = apply_peft(model, cfg, PEFT_TASK_TYPES.get(task), tokenizer_dir)
    for name, param in model.named_parameters():
        if ".bottleneck_" in name or (cfg.head and is_head_parameter(name)):
            param.requires_grad_(True)
    return model


def is_head_parameter(parameter_name: str) -> bool:
    """A task-head weight (score/classifier), not an adapter inside it."""
    parts = parameter_name.split(".")
    return any(part in HEAD_MODULES for part in parts[:-1]) and "lora_" not in parameter_name


def trainable_summary(model: torch.nn.Module) -> TrainableSummary:
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return TrainableSummary(trainable, total)


__all__ = ["MethodConfig", "TrainableSummary", "apply_methods", "is_head_parameter", "trainable_summary"]
