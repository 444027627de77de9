"""``method.activation``: ReLU-fication -- replace the MLP's smooth activation by ReLU, then train.

A gated MLP computes ``down(act(gate(x)) · up(x))``. With SiLU almost no intermediate value is
exactly zero; with ReLU every negative gate zeroes its channel, so ``down_proj`` meets mostly zero
inputs and batch-1 decoding can skip their weight rows (``compress.sparse_input``, a
``sparsify: activations`` step with ``sparsity: 0``). Swapping the function changes the model, so
the run that applies it is the recovery fine-tune (Mirzadeh et al. 2023, "ReLU Strikes Back":
stage 1, the MLP activation; their stage 2, ReLUs before the attention and MLP inputs, is not
offered: it would leave a model plain ``transformers`` cannot rebuild from its config).

The activation is written to the config (``hidden_act``), so the trained model saves, reloads and
exports as an ordinary model of its architecture; an adapter run re-applies it to the base on load.

A sudden swap is a large shock (SmolLM2's perplexity goes from ~10 to ~16,000), which the recovery
must undo first. ``anneal`` makes it gradual instead: the MLPs compute ``x·sigmoid(βx)``, which is
SiLU at β = 1 and tends to ReLU as β grows, and β rises geometrically from 1 to ``anneal_beta``
over that fraction of the run's optimizer steps (``train.relu_annealing``, a callback); from then on
the MLPs compute ReLU exactly (the last step at least, so the run ends on the function it saves).
At step 0 the model is the one it started from, which is why the anneal needs a SiLU model.

``floor`` takes the other way round the shock. Most of what a swap destroys is the SiLU's negative
lobe: summed over the ~60% of channels a negative gate closes, those small negative values carry
much of the MLP's output (SmolLM2 with zero there instead: perplexity 13,550 against 49; with each
channel's mean there: 77; docs/activation_sparsity.md). A floored ReLU gives a closed channel a
constant per channel, ``c`` (its mean SiLU output on negative gates, calibrated on the first batch
the model reads, then trained), so ``down((relu(g) + c·[g ≤ 0])·up(x))`` is
``down(((g - c)·[g > 0])·up(x)) + (down·diag(c)·up)·x``: exact zeros on the closed channels plus
one dense hidden×hidden product, which batch-1 decoding can still skip the closed rows around.
``hidden_act`` stays ``relu``; the floors are saved beside the model (``activation_floors.safetensors``)
and only tunelab rebuilds them, so a floored run does not export as a plain model; ``tunelab compress``
keeps them (``compress.store``) and ``sparsify: gated-mlp`` decodes them (``SparseGatedMLP``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.activations import ACT2FN

from tunelab.activations import FlooredReLU
from tunelab.config_base import Section
from tunelab.errors import UserError
from tunelab.methods.base import Method, MethodContext, register_method


class ActivationConfig(Section):
    """Replace the MLP activation (ReLU-fication); the run trains the model to recover."""

    mlp: Literal["relu", "relu2"] = Field(
        "relu", description="relu: max(0, x); relu2: its square (Primer). Both make exact zeros wherever the gate is negative."
    )
    anneal: float = Field(
        0.0, ge=0, le=1, description="Fraction of the run's optimizer steps over which SiLU turns into ReLU (x·sigmoid(βx), "
        "β rising from 1 to anneal_beta); 0 swaps at once. relu only.",
    )
    anneal_beta: float = Field(64.0, gt=1, description="β at the end of the anneal, where the MLPs switch to exact ReLU (x·sigmoid(64x) is within 0.005 of it).")
    floor: bool = Field(
        False, description="A closed channel (gate ≤ 0) outputs a trained constant of its own instead of 0, first its mean SiLU "
        "output there (calibrated on the first batch): the swap then keeps most of the model. relu only, swapped at once.",
    )

    @model_validator(mode="after")
    def _anneal_to_relu(self) -> ActivationConfig:
        if self.anneal and self.mlp != "relu":
            raise ValueError(f"anneal turns SiLU into relu; it has no path to {self.mlp} (use mlp: relu, or anneal: 0)")
        if self.floor and (self.mlp != "relu" or self.anneal):
            raise ValueError("floor is for mlp: relu swapped at once (anneal: 0): the floors are what keeps the swap small")
        return self


class AnnealedReLU(nn.Module):
    """``x·sigmoid(βx)``: SiLU at β = 1, ReLU in the limit, which ``beta = inf`` computes exactly."""

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) if self.beta == float("inf") else x * torch.sigmoid(self.beta * x)

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"


def floored_relus(model: nn.Module) -> list[FlooredReLU]:
    """The model's floored ReLUs in module order (one per gated MLP)."""
    return [m for m in model.modules() if isinstance(m, FlooredReLU)]


def gated_mlps(model: nn.Module) -> dict[str, nn.Module]:
    """Llama-style gated MLPs by name: ``down(act(gate(x)) · up(x))`` with the activation in ``act_fn``."""
    return {name: m for name, m in model.named_modules() if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))}


def mlp_activation(model: nn.Module) -> str | None:
    """The activation the model's config names for its MLPs (``hidden_act``), if any."""
    return getattr(_text_config(model), "hidden_act", None)


def _text_config(model: nn.Module):  # noqa: ANN202 (a transformers PretrainedConfig)
    """The language model's config (a vision-language model nests it)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def replace_mlp_activation(model: nn.Module, name: str, annealed: bool = False, floor: bool = False) -> nn.Module:
    """Put ``ACT2FN[name]`` (an ``AnnealedReLU`` at β = 1 when ``annealed``, an uncalibrated
    ``FlooredReLU`` when ``floor``) in every gated MLP and record ``name`` in the config's
    ``hidden_act``: what the model computes once trained (on its open channels, when floored)."""
    mlps = gated_mlps(model)
    if mlp_activation(model) is None or not mlps:
        kind = getattr(model.config, "model_type", "this")
        raise UserError(f"{kind} models have no gated MLP activation to replace (supported: Llama-style models with config.hidden_act)",
                        where="method.activation", hint="remove method.activation from the recipe")
    _text_config(model).hidden_act = name
    for module in mlps.values():
        if floor:
            module.act_fn = FlooredReLU(module.up_proj.out_features)
        else:
            module.act_fn = AnnealedReLU() if annealed else ACT2FN[name]
    return model


@register_method
class ActivationMethod(Method):
    key = "activation"
    Config = ActivationConfig
    order = 8  # before adapters wrap the model
    mergeable = False  # nothing to fold; save() writes the floors next to whatever holds the weights
    compressible_unmerged = True  # the compressed-model store keeps floored ReLUs; gated-mlp decodes them

    def apply(self, model: nn.Module, cfg: ActivationConfig, ctx: MethodContext) -> nn.Module:
        current = mlp_activation(model)
        for option, on in (("anneal", cfg.anneal > 0), ("floor", cfg.floor)):
            if on and current not in ("silu", "swish"):
                raise UserError(f"{option} starts from SiLU (x·sigmoid(x)); this model's MLP activation is {current}",
                                where=f"method.activation.{option}", hint="set anneal: 0 and floor: false to swap the activation as it is")
        return replace_mlp_activation(model, cfg.mlp, annealed=cfg.anneal > 0, floor=cfg.floor)

    def added_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(floored_relus(model))

    def save(self, model: nn.Module, cfg: Any, directory: Path) -> list[str]:
        floors = floored_relus(model)
        if not floors:
            return []
        save_file({str(i): act.floor.detach().float().contiguous() for i, act in enumerate(floors)}, str(directory / FlooredReLU.FLOORS_FILE))
        return [FlooredReLU.FLOORS_FILE]

    def merge(self, model: nn.Module) -> nn.Module:
        """Refused for floored MLPs: a plain model's config says ``relu``, which without the floors
        is a different model (export and a stage trained on top start here; compression does not
        merge this method, see ``compressible_unmerged``)."""
        if floored_relus(model):
            raise UserError("this model's MLPs have floored ReLUs (method.activation.floor), which a plain model cannot hold",
                            where="method.activation.floor",
                            hint="evaluate, generate, serve and compress it with tunelab; for a model to export or train further, recover with floor: false")
        return model

    def load(self, model: nn.Module, cfg: Any, directory: Path, ctx: MethodContext) -> nn.Module:
        chosen = cfg if isinstance(cfg, dict) else cfg.model_dump()
        model = replace_mlp_activation(model, chosen["mlp"], floor=chosen.get("floor", False))
        floors = floored_relus(model)
        if floors:
            saved = load_file(str(directory / FlooredReLU.FLOORS_FILE))
            for i, act in enumerate(floors):
                act.floor.data.copy_(saved[str(i)])
        return model

