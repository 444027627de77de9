"""Dropout overrides: set hidden/attention dropout on the config and on live Dropout modules."""

from __future__ import annotations

import torch

from tunelab.methods.base import Method, MethodContext, register_method
from tunelab.methods.config import DropoutConfig

HIDDEN_KEYS = ("hidden_dropout_prob", "hidden_dropout", "resid_pdrop", "dropout")
ATTENTION_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def apply_dropout(model: torch.nn.Module, cfg: DropoutConfig) -> torch.nn.Module:
    """Models read some dropout rates from the config at forward time and bake others into
    ``nn.Dropout`` modules at construction, so both are updated."""
    for value, keys, is_attention in ((cfg.hidden, HIDDEN_KEYS, False), (cfg.attention, ATTENTION_KEYS, True)):
        if value is None:
            continue
        for key in keys:
            if hasattr(model.config, key):
                setattr(model.config, key, value)
        for name, module in model.named_modules():
            attention_module = "attn" in name or "attention" in name
            if attention_module == is_attention:
                if isinstance(module, torch.nn.Dropout):
                    module.p = value
                elif hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
                    module.attention_dropout = value
    return model


@register_method
class DropoutMethod(Method):
    key = "dropout"
    Config = DropoutConfig
    order = 10

    def apply(self, model: torch.nn.Module, cfg: DropoutConfig, ctx: MethodContext) -> torch.nn.Module:
        return apply_dropout(model, cfg)
