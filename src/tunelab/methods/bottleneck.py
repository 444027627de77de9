"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) for any transformer block.

An adapter is ``x + up(act(down(x)))`` inserted after a sub-layer's output projection, before the
residual add. Houlsby places one after attention and one after the MLP; Pfeiffer only after the
MLP. ``up`` starts at zero, so the adapted model starts exactly at the base model.

Adapters attach as child modules of each block (``bottleneck_attn``, ``bottleneck_mlp``) and are
applied through forward hooks on the projection, so the model's own modules, its state-dict keys
and other methods (LoRA on the same projection) are left untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunelab import atomic
from tunelab.errors import UserError
from tunelab.methods.base import Method, MethodContext, register_method
from tunelab.methods.blocks import ATTENTION_OUTPUT, MLP_OUTPUT, block_list, sublayer
from tunelab.methods.config import BottleneckConfig

ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU, "tanh": torch.nn.Tanh}
SLOTS = {"bottleneck_attn": ATTENTION_OUTPUT, "bottleneck_mlp": MLP_OUTPUT}
WEIGHTS, SETTINGS = "bottleneck.safetensors", "bottleneck.json"


class BottleneckAdapter(torch.nn.Module):
    """down-projection, non-linearity, zero-initialised up-projection, residual."""

    def __init__(self, hidden: int, width: int, activation: str, dropout: float):
        super().__init__()
        self.down = torch.nn.Linear(hidden, width)
        self.act = ACTIVATIONS[activation]()
        self.dropout = torch.nn.Dropout(dropout)
        self.up = torch.nn.Linear(width, hidden)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.dropout(self.act(self.down(x))))


def _apply_hook(adapter: BottleneckAdapter):  # type: ignore[no-untyped-def]
    def hook(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        return adapter(output)

    return hook


def apply_bottleneck(model: torch.nn.Module, cfg: BottleneckConfig) -> torch.nn.Module:
    """Insert adapters into every block (they train; freezing the base is ``method.freeze.base``)."""
    hidden = model.config.hidden_size
    width = max(1, hidden // cfg.reduction_factor)
    slots = SLOTS if cfg.style == "houlsby" else {"bottleneck_mlp": MLP_OUTPUT}
    _, blocks = block_list(model)
    for block in blocks:
        for slot, paths in slots.items():
            target = sublayer(block, paths)
            if target is None:
                raise ValueError(f"no {slot} projection found in {type(block).__name__} (looked for {paths})")
            adapter = BottleneckAdapter(hidden, width, cfg.activation, cfg.dropout).to(next(block.parameters()).dtype)
            block.add_module(slot, adapter)
            target.register_forward_hook(_apply_hook(adapter))
    return model


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors, keyed by their path in the model."""
    ids = {id(p) for module in model.modules() if isinstance(module, BottleneckAdapter) for p in module.parameters()}
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if id(p) in ids}


@register_method
class BottleneckMethod(Method):
    """Bottleneck adapters as a method: added after any peft adapter, saved as their own files."""

    key = "bottleneck"
    Config = BottleneckConfig
    order = 55
    mergeable = False  # they add non-linear layers

    def apply(self, model: torch.nn.Module, cfg: BottleneckConfig, ctx: MethodContext) -> torch.nn.Module:
        return apply_bottleneck(model, cfg)

    def added_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return [m for m in model.modules() if isinstance(m, BottleneckAdapter)]

    def save(self, model: torch.nn.Module, cfg: BottleneckConfig, directory: Path) -> list[str]:
        """``bottleneck.safetensors`` (adapter weights) + ``bottleneck.json`` (how to rebuild them)."""
        save_file(adapter_state(model), str(directory / WEIGHTS))
        atomic.write_text(directory / SETTINGS, json.dumps(cfg.model_dump(), indent=2))
        return [WEIGHTS, SETTINGS]

    def load(self, model: torch.nn.Module, cfg: object, directory: Path, ctx: MethodContext) -> torch.nn.Module:
        """Rebuild from ``bottleneck.json`` (what the adapters were), not from today's schema."""
        saved = json.loads((directory / SETTINGS).read_text())
        apply_bottleneck(model, BottleneckConfig.model_validate({k: v for k, v in saved.items() if k in BottleneckConfig.model_fields}))
        weights = load_file(str(directory / WEIGHTS))
        missing = set(adapter_state(model)) - set(weights)
        if missing:
            raise UserError(f"{WEIGHTS} lacks {sorted(missing)[:3]}", where=str(directory))
        model.load_state_dict(weights, strict=False)
        return model

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.added_modules(model):
            raise UserError("bottleneck adapters cannot be merged into the base weights (they add non-linear layers)", hint="load the run directory with tunelab instead")
        return model
