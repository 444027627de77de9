"""The PEFT adapter families (LoRA, DoRA, rsLoRA, QLoRA, IA3, prompt tuning, prefix tuning) via ``peft``.

peft is the reference implementation and its adapter folders are what the ecosystem loads
(``PeftModel.from_pretrained``), so tunelab only maps recipe settings onto peft configs and
delegates saving, loading and merging to peft. This is the one module that knows peft's
wrapper, its parameter naming and its merge call; everything else asks ``is_peft_model`` and
``merge_adapters``. ``target_modules: auto`` uses peft's per-architecture defaults;
``all-linear`` adapts every linear layer except the output head.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import peft
import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from tunelab.errors import UserError
from tunelab.methods.base import Method, MethodContext, register_method
from tunelab.methods.config import (
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from tunelab.models.vision import is_vision_language, vlm_parts

ADAPTER_DIR = "adapter"

#: peft's task type per model class family: it decides which forward signature the wrapper
#: exposes and which head modules stay trainable; masked LM has none and takes the plain wrapper.
PEFT_TASK_TYPES = {
    "causal-lm": "CAUSAL_LM",
    "sequence-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
    "base": "FEATURE_EXTRACTION",
}


def is_peft_model(model: torch.nn.Module) -> bool:
    """True for a model wrapped by peft (adapters attached)."""
    return isinstance(model, peft.PeftModel)


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if is_peft_model(model) else model


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """Prompt/prefix tuning: virtual tokens that a token mask cannot describe and no merge can remove."""
    return is_peft_model(model) and bool(getattr(model.active_peft_config, "is_prompt_learning", False))


def merge_adapters(model: torch.nn.Module, adapter_names: list[str] | None = None) -> torch.nn.Module:
    """The plain model with its peft adapters folded into its weights (the model itself when there
    is none): the active ones, or those named (a hierarchical model's stack)."""
    if not is_peft_model(model):
        return model
    if is_prompt_learning(model):
        raise UserError("prompt/prefix tuning adds virtual tokens and cannot be merged into the weights", hint="load the run directory with tunelab instead")
    return model.merge_and_unload(adapter_names=adapter_names)


@dataclass(frozen=True)
class LoraParts:
    """One adapted projection: frozen ``weight``, adapter ``a``/``b``, ``scale``, dropout ``p`` (0 in
    eval) and the module that drops the adapter's input (a fused function draws its masks only where
    it can draw them as that module would: ``tunelab.train.bit_dropout.fused_rate``)."""

    weight: torch.Tensor
    a: torch.nn.Parameter
    b: torch.nn.Parameter
    scale: float
    dropout: float
    dropper: torch.nn.Module


def lora_parts(layer: torch.nn.Module) -> LoraParts | None:
    """``layer``'s pieces when it is a peft LoRA linear layer that a fused function can compute in its
    place (``tunelab.train.fused_mlp``): one plain adapter, active, unmerged, no hooks; else None."""
    if not isinstance(layer, LoraLayer):
        return None  # IA3, bottleneck and other peft layers also have a base_layer
    base = getattr(layer, "base_layer", None)
    if type(base) is not torch.nn.Linear or base.bias is not None or base.weight.requires_grad:
        return None
    if getattr(layer, "disable_adapters", True) or getattr(layer, "merged", True) or getattr(layer, "lora_variant", None):
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    a, b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if type(a) is not torch.nn.Linear or type(b) is not torch.nn.Linear or a.bias is not None or b.bias is not None:
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in (layer, base, a, b)):
        return None  # a hook (pruning masks, importance scores, captured activations) must see its call
    if not (a.weight.requires_grad and b.weight.requires_grad):
        return None
    if isinstance(dropout, torch.nn.Dropout):
        p = dropout.p if layer.training else 0.0
    elif isinstance(dropout, torch.nn.Identity):
        p = 0.0
    else:
        return None
    return LoraParts(base.weight, a.weight, b.weight, float(layer.scaling[name]), p, dropout)


def lora_dropouts(model: torch.nn.Module) -> list[tuple[torch.nn.ModuleDict, str]]:
    """Where each LoRA adapter of ``model`` keeps its input dropout: (its layer's module dict, the
    adapter's name), for a trainer that swaps the dropout module (``train/bit_dropout.py``)."""
    return [(module.lora_dropout, name) for module in model.modules() if isinstance(module, LoraLayer) for name in module.lora_dropout]


def lora_config_like(config: peft.LoraConfig, r: int | None, alpha: float | None) -> peft.LoraConfig:
    """A copy of ``config`` (same layers, dropout, variant) with rank ``r`` and alpha ``alpha`` where given."""
    copied = copy.deepcopy(config)
    copied.r = r or config.r
    copied.lora_alpha = alpha or config.lora_alpha
    return copied


def _targets(value: str | list[str]) -> Any:
    return None if value == "auto" else value


def _language_model_only(config: peft.PeftConfig, model: torch.nn.Module, key: str) -> peft.PeftConfig:
    """On a vision-language model, default targets (``auto``, ``all-linear``) mean the language
    model's linear layers: peft's defaults would also adapt the vision tower's attention and the
    projector, which ``method.vision`` trains (or freezes) on purpose."""
    targets = getattr(config, "target_modules", None)
    if targets not in (None, "all-linear"):
        return config
    if not isinstance(config, peft.LoraConfig):
        raise UserError(f"method.{key} on a vision-language model needs explicit target_modules", where=f"method.{key}.target_modules", hint="e.g. [q_proj, v_proj] (they match the vision tower's too), or use method.lora")
    language_model = vlm_parts(model)["language_model"]
    names = sorted({name.rsplit(".", 1)[-1] for name, module in language_model.named_modules() if isinstance(module, torch.nn.Linear)})
    config.target_modules = rf"^(?:.*\.)?language_model\.(?:.*\.)?(?:{'|'.join(names)})$"
    return config


class PeftMethod(Method, ABC):
    """One peft adapter family; subclasses say how a recipe section becomes a peft config."""

    order = 50

    @abstractmethod
    def peft_config(self, cfg: Any, task_type: str | None, ctx: MethodContext) -> peft.PeftConfig:
        """The peft config for this family's recipe section."""

    def apply(self, model: torch.nn.Module, cfg: Any, ctx: MethodContext) -> torch.nn.Module:
        """Wrap ``model`` in a ``PeftModel``; peft freezes everything but the adapters (and heads)."""
        config = self.peft_config(cfg, PEFT_TASK_TYPES.get(ctx.model_task), ctx)
        if is_vision_language(getattr(model, "config", None)):
            config = _language_model_only(config, model, self.key)
        try:
            return peft.get_peft_model(model, config)
        except ValueError as exc:
            raise UserError(f"method.{self.key}: {str(exc).splitlines()[0][:200]}", hint="check target_modules against the model's layer names") from None

    def added_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        if not is_peft_model(model):
            return []
        if is_prompt_learning(model):
            return [model.prompt_encoder]
        added: list[torch.nn.Module] = []
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                added += [child for name, child in module.named_children() if name != "base_layer"]
        return added

    def save(self, model: torch.nn.Module, cfg: Any, directory: Path) -> list[str]:
        model.save_pretrained(directory / ADAPTER_DIR)
        return [f"{ADAPTER_DIR}/"]

    def load(self, model: torch.nn.Module, cfg: Any, directory: Path, ctx: MethodContext) -> torch.nn.Module:
        if not (directory / ADAPTER_DIR).exists():  # merged into final/model
            return model
        return peft.PeftModel.from_pretrained(model, str(directory / ADAPTER_DIR))

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        return merge_adapters(model)


@register_method
class LoraMethod(PeftMethod):
    """LoRA and its variants: DoRA (``use_dora``), rsLoRA (``use_rslora``), QLoRA (``qlora``: NF4 base)."""

    key = "lora"
    Config = LoraConfig

    def apply(self, model: torch.nn.Module, cfg: LoraConfig, ctx: MethodContext) -> torch.nn.Module:
        if cfg.qlora:
            from tunelab.compress.qlora import nf4_base

            model = nf4_base(model)
        return super().apply(model, cfg, ctx)

    def tensor_parallel_parts(self, module: torch.nn.Module, style: str) -> dict[str, str] | None:
        """The base layer splits as the plan says; of the low-rank pair, the factor that touches
        the split side splits the same way and the other stays whole: under a column split, B
        (its outputs are the layer's split outputs) and A whole on the whole input; under a row
        split, A (it reads the split input; its r outputs are summed over processes) and B whole."""
        if not isinstance(module, LoraLayer):
            return None
        if any(module.use_dora.values()):
            raise UserError("tensor parallelism does not split DoRA layers: DoRA rescales each weight column by its whole norm",
                            where="method.lora.use_dora", hint="use plain LoRA, or strategy fsdp")
        factor = "lora_B" if style == "colwise" else "lora_A"
        return {"base_layer": style, **{f"{factor}.{adapter}": style for adapter in module.lora_A}}

    def peft_config(self, cfg: LoraConfig, task_type: str | None, ctx: MethodContext) -> peft.PeftConfig:
        return peft.LoraConfig(
            task_type=task_type, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
            target_modules=_targets(cfg.target_modules), use_dora=cfg.use_dora, use_rslora=cfg.use_rslora, bias=cfg.bias,
        )


@register_method
class IA3Method(PeftMethod):
    """(IA)^3: learned rescaling of keys, values and feed-forward activations."""

    key = "ia3"
    Config = IA3Config

    def peft_config(self, cfg: IA3Config, task_type: str | None, ctx: MethodContext) -> peft.PeftConfig:
        return peft.IA3Config(task_type=task_type, target_modules=_targets(cfg.target_modules), feedforward_modules=_targets(cfg.feedforward_modules))


@register_method
class PromptTuningMethod(PeftMethod):
    """A trainable soft prompt of virtual tokens, optionally initialised from a text's embeddings."""

    key = "prompt_tuning"
    Config = PromptTuningConfig
    mergeable: ClassVar[bool] = False

    def peft_config(self, cfg: PromptTuningConfig, task_type: str | None, ctx: MethodContext) -> peft.PeftConfig:
        if cfg.init_text:
            return peft.PromptTuningConfig(
                task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens, prompt_tuning_init=peft.PromptTuningInit.TEXT,
                prompt_tuning_init_text=cfg.init_text, tokenizer_name_or_path=ctx.tokenizer_dir,
            )
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)


@register_method
class PrefixTuningMethod(PeftMethod):
    """Trainable key/value prefixes in every attention layer."""

    key = "prefix_tuning"
    Config = PrefixTuningConfig
    mergeable: ClassVar[bool] = False

    def peft_config(self, cfg: PrefixTuningConfig, task_type: str | None, ctx: MethodContext) -> peft.PeftConfig:
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)


PEFT_FAMILIES = (LoraMethod.key, IA3Method.key, PromptTuningMethod.key, PrefixTuningMethod.key)
