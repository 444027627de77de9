"""The PEFT adapter families (LoRA, DoRA, rsLoRA, IA3, prompt tuning, prefix tuning) via ``peft``.

peft is the reference implementation and its adapter folders are what the ecosystem loads
(``PeftModel.from_pretrained``), so tunelab only maps recipe settings onto peft configs.
``target_modules: auto`` uses peft's per-architecture defaults; ``all-linear`` adapts every linear
layer except the output head.
"""

from __future__ import annotations

from typing import Any

import peft
import torch

from tunelab.errors import UserError
from tunelab.methods.config import MethodConfig


def _targets(value: str | list[str]) -> Any:
    return None if value == "auto" else value


def peft_config(cfg: MethodConfig, task_type: str | None, tokenizer_name: str | None = None) -> peft.PeftConfig:
    """Translate the recipe's adapter section into the matching peft config."""
    family = cfg.peft_family()
    if family == "lora":
        lora = cfg.lora
        return peft.LoraConfig(
            task_type=task_type, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=_targets(lora.target_modules), use_dora=lora.use_dora, use_rslora=lora.use_rslora, bias=lora.bias,
        )
    if family == "ia3":
        ia3 = cfg.ia3
        return peft.IA3Config(
            task_type=task_type, target_modules=_targets(ia3.target_modules), feedforward_modules=_targets(ia3.feedforward_modules)
        )
    if family == "prompt_tuning":
        pt = cfg.prompt_tuning
        if pt.init_text:
            return peft.PromptTuningConfig(
                task_type=task_type, num_virtual_tokens=pt.num_virtual_tokens,
                prompt_tuning_init=peft.PromptTuningInit.TEXT, prompt_tuning_init_text=pt.init_text, tokenizer_name_or_path=tokenizer_name,
            )
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=pt.num_virtual_tokens)
    if family == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=cfg.prefix_tuning.num_virtual_tokens)
    raise ValueError(f"no PEFT family in {cfg}")


def apply_peft(model: torch.nn.Module, cfg: MethodConfig, task_type: str | None, tokenizer_name: str | None = None) -> torch.nn.Module:
    """Wrap ``model`` in a ``PeftModel``; peft freezes everything but the adapters (and heads)."""
    config = peft_config(cfg, task_type, tokenizer_name)
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"method.{cfg.peft_family()}: {str(exc).splitlines()[0][:200]}", hint="check target_modules against the model's layer names") from None
