"""``method.init``: how the parameters other methods add (adapters, task heads) start.

Each method initialises its modules the way its authors published (LoRA: A random, B zero; a
head: normal(0, 0.02)); this section re-draws them with another scheme, or copies them from a
model that already has them (a teacher's head, another run's adapter). It runs after every other
method (order 95) and touches only what they added, found through their ``added_modules``.

What makes an adapter start as the identity is kept: a matrix its method set to a constant (LoRA's
B and a bottleneck's up-projection at zero, IA3's scales at one) stays as it is, so the model still
computes exactly what the base computed at step 0; only the randomly drawn matrices are re-drawn.
Biases and other vectors stay as their method set them, except under ``zeros``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file

from tunelab.config_base import Section
from tunelab.errors import UserError
from tunelab.methods.base import (
    METHODS,
    Method,
    MethodContext,
    owned_parameter_ids,
    register_method,
)
from tunelab.methods.peft_adapters import is_peft_model
from tunelab.rundir import final_dir

#: What peft's wrappers add to a parameter's name; removed so a plain model's names match a wrapped
#: one's (the frozen ``original_module`` copy peft keeps of a trained head keeps its own name).
_WRAPPER_PARTS = re.compile(r"^base_model\.model\.|\.modules_to_save\.default(?=\.)|\.default(?=\.|$)")


class InitConfig(Section):
    """Initialisation of the parameters the other methods add (adapters, task heads)."""

    strategy: Literal["default", "zeros", "normal", "xavier", "orthogonal", "kaiming"] = Field(
        "default", description="default keeps each method's own; zeros (heads only), normal(0, std), xavier (uniform), orthogonal, kaiming (uniform, as nn.Linear)."
    )
    std: float = Field(0.02, gt=0, description="Standard deviation for strategy normal.")
    from_model: str | None = Field(
        None, description="Copy the added parameters from this run directory, model folder or .safetensors file (matched by name and shape), after the strategy."
    )


def _redraw(param: torch.Tensor, strategy: str, std: float) -> None:
    """Draw a randomly initialised matrix again (``zeros`` is handled by the caller: it also clears vectors)."""
    if strategy == "normal":
        torch.nn.init.normal_(param, 0.0, std)
    elif strategy == "xavier":
        torch.nn.init.xavier_uniform_(param)
    elif strategy == "orthogonal":
        torch.nn.init.orthogonal_(param)
    elif strategy == "kaiming":
        torch.nn.init.kaiming_uniform_(param, a=math.sqrt(5))


def plain_name(name: str) -> str:
    """``name`` without peft's wrapper parts: the same parameter's name in a model with or without them."""
    return _WRAPPER_PARTS.sub("", name)


@register_method
class InitMethod(Method):
    key = "init"
    Config = InitConfig
    order = 95

    def apply(self, model: torch.nn.Module, cfg: InitConfig, ctx: MethodContext) -> torch.nn.Module:
        others = [METHODS.get(k) for k in METHODS if k != self.key]
        owned = owned_parameter_ids(model, others)
        added = [(name, p) for name, p in model.named_parameters() if id(p) in owned]
        if not added:
            raise UserError("method.init: no method here adds parameters to initialise", where="method.init",
                            hint="it applies to what lora, ia3, bottleneck or a head adds")
        if cfg.strategy == "zeros" and (is_peft_model(model) or METHODS.get("bottleneck").added_modules(model)):
            raise UserError("method.init.strategy zeros would leave both factors of an adapter at zero: it would never get a gradient",
                            where="method.init.strategy", hint="use zeros for a task head; normal, xavier, orthogonal or kaiming for adapters")
        if cfg.strategy != "default":
            with torch.no_grad():
                for _, param in added:
                    if cfg.strategy == "zeros":
                        param.zero_()
                    elif param.dim() >= 2 and not _constant(param):
                        _redraw(param, cfg.strategy, cfg.std)
        if cfg.from_model:
            self._copy_from(cfg.from_model, added)
        return model

    def _copy_from(self, source: str, added: list[tuple[str, torch.nn.Parameter]]) -> None:
        weights = _saved_weights(Path(source).expanduser())
        copied = 0
        with torch.no_grad():
            for name, param in added:
                found = weights.get(plain_name(name))
                if found is not None and found.shape == param.shape:
                    param.copy_(found.to(param.dtype))
                    copied += 1
        if not copied:
            raise UserError("method.init.from_model: none of the added parameters has a match (same name and shape) there",
                            where=source, hint="name a run trained with the same method settings, or a model with the same head")
        print(f"tunelab: method.init copied {copied} of {len(added)} added tensors from {source}", flush=True)


def _saved_weights(source: Path) -> dict[str, torch.Tensor]:
    """Every tensor saved in ``source`` (a run directory's final model, a model folder or one
    ``.safetensors`` file), by its name without peft's wrapper parts."""
    if source.is_file() and source.suffix == ".safetensors":
        files = [source]
    elif source.is_dir():
        files = sorted(final_dir(source).rglob("*.safetensors"))
    else:
        files = []
    if not files:
        raise UserError("method.init.from_model: no saved weights there", where=str(source),
                        hint="name a run directory, a Hugging Face model folder or a .safetensors file")
    return {plain_name(name): tensor for path in files for name, tensor in load_file(str(path)).items()}


def _constant(param: torch.Tensor) -> bool:
    flat = param.detach().reshape(-1)
    return bool((flat == flat[0]).all())

