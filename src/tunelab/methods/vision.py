"""Vision-language training in the LLaVA stages: which parts of the VLM learn.

LLaVA trains in stages: first the projector alone (the vision tower and the language model
frozen: the projector learns to speak the LM's embedding language), then the projector with the
LM (LLaVA fully; with little compute, ``method.lora`` on the LM), and optionally the vision tower.
``method.vision.train`` names the parts; the LM's own weights stay frozen unless listed, so a
stage is one recipe and the next stage's recipe starts from the previous run directory.

Runs after peft (which freezes everything but its adapters) so the parts named here train
whatever an adapter method froze. When only the projector and/or the vision tower train, their
weights are saved as ``vision.safetensors`` beside any adapter and the base is named in the
manifest, as for a task head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from tunelab.config_base import Section
from tunelab.errors import UserError
from tunelab.methods.base import Method, MethodContext, register_method
from tunelab.methods.peft_adapters import is_peft_model
from tunelab.models.vision import vlm_parts

VISION_WEIGHTS = "vision.safetensors"
Part = Literal["projector", "vision_tower", "language_model"]


class VisionConfig(Section):
    """Train a LLaVA-style vision-language model's parts (stage 1: ``[projector]``; stage 2: add
    ``method.lora`` for the language model; ``vision_tower`` to adapt the encoder as well)."""

    train: list[Part] = Field(
        default_factory=lambda: ["projector"],
        min_length=1,
        description="Parts that train: projector, vision_tower, language_model (its full weights; use method.lora for adapters instead).",
    )


@register_method
class VisionMethod(Method):
    key = "vision"
    Config = VisionConfig
    order = 65

    def apply(self, model: torch.nn.Module, cfg: VisionConfig, ctx: MethodContext) -> torch.nn.Module:
        parts = vlm_parts(model)
        if "language_model" in cfg.train and is_peft_model(model):
            raise UserError("method.vision.train lists language_model (all its weights) and an adapter trains it too", where="method.vision.train", hint="remove language_model to train the LM through the adapter, or remove the adapter")
        if not is_peft_model(model):  # peft already froze the LM's own weights and left its adapters trainable
            for name in ("language_model", "lm_head"):
                if name in parts:
                    parts[name].requires_grad_("language_model" in cfg.train)
        parts["vision_tower"].requires_grad_("vision_tower" in cfg.train)
        parts["projector"].requires_grad_("projector" in cfg.train)
        return model

    def added_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The projector and vision tower once they train: saved here, not as base weights."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "vision_config", None) is None:
            return []
        parts = vlm_parts(model)
        return [parts[n] for n in ("projector", "vision_tower") if any(p.requires_grad for p in parts[n].parameters())]

    def save(self, model: torch.nn.Module, cfg: Any, directory: Path) -> list[str]:
        parts = vlm_parts(model)
        weights = {f"{name}.{key}": value.detach().cpu().contiguous() for name in ("projector", "vision_tower") if name in _train(cfg) for key, value in parts[name].state_dict().items()}
        save_file(weights, str(directory / VISION_WEIGHTS))
        return [VISION_WEIGHTS]

    def load(self, model: torch.nn.Module, cfg: Any, directory: Path, ctx: MethodContext) -> torch.nn.Module:
        path = directory / VISION_WEIGHTS
        if not path.exists():  # the parts were saved inside final/model with the language model
            return model
        parts = vlm_parts(model)
        weights = load_file(str(path))
        for name in ("projector", "vision_tower"):
            own = {key.split(".", 1)[1]: value for key, value in weights.items() if key.split(".", 1)[0] == name}
            if own:
                try:
                    parts[name].load_state_dict(own)
                except RuntimeError as exc:
                    raise UserError(f"trained {name} weights do not fit the rebuilt model ({str(exc).splitlines()[0][:120]})", where=str(path)) from None
        return model


def _train(cfg: Any) -> list[str]:
    """``train`` of a live config or of the manifest's saved dict."""
    return list(cfg.train if isinstance(cfg, VisionConfig) else (cfg or {}).get("train", ["projector"]))
