"""Post-training quantization of a model's linear layers, with selective precision.

Formats:
- ``dynamic-int8``: int8 weights (per-channel scales) and activations quantized on the fly, so
  the matrix products run in int8: the one PTQ format faster than fp32 on CPU. One activation
  scale per token, optionally after SmoothQuant smoothing (``int8_dynamic``; the recipe's default
  is α = 0.8); ``activations: per-tensor`` is torch.ao's dynamic quantization (one scale per
  tensor), kept as the reference it improves on.
- ``int8``, ``int4``, ``ternary``, ``fixed-point``: weight-only, packed (see ``qlinear``): smaller
  in RAM and on disk, slower (dequantized at each forward).
- ``nf4``: bitsandbytes 4-bit NormalFloat, via transformers' own loader so the result saves and
  reloads with plain ``from_pretrained`` (bitsandbytes installed).
Selective precision keeps layers at full precision by name (``keep``) or by a sensitivity scan
(``keep_sensitive``: the N layers whose quantization alone moves the output most).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from tunelab.compress.calibration import input_absmax
from tunelab.compress.int8_dynamic import DynamicInt8Linear, smoothing_scales
from tunelab.compress.modules import set_module
from tunelab.compress.qlinear import WEIGHT_FORMATS, QuantLinear, QuantSpec
from tunelab.compress.sensitivity import most_sensitive, sensitivity_scan
from tunelab.compress.targets import linear_layers, matching
from tunelab.errors import UserError

FORMATS = ("dynamic-int8", *WEIGHT_FORMATS, "nf4")


def quantize(
    model: nn.Module,
    fmt: str,
    *,
    group_size: int | None = 128,
    bits: int = 8,
    activations: str = "per-token",
    smooth: float = 0.0,
    targets: Iterable[str] = (),
    keep: Iterable[str] = (),
    keep_sensitive: int = 0,
    chunks: torch.Tensor | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize ``model``'s target linears; returns the model (a new object for nf4) and a report.

    ``activations`` and ``smooth`` (SmoothQuant's α; needs ``chunks``) apply to dynamic-int8 only.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown quantization format {fmt!r}", hint="choose one of " + ", ".join(FORMATS))
    layers = linear_layers(model, targets)
    kept = matching(layers, keep)
    make = _layer_maker(model, layers, fmt, QuantSpec(fmt, group_size, bits) if fmt in WEIGHT_FORMATS else None,
                        activations, smooth, chunks)
    report: dict[str, Any] = {"format": fmt}
    if keep_sensitive:
        if chunks is None:
            raise UserError("keep_sensitive needs calibration text for its scan", hint="set compress.calibration")
        candidates = {n: m for n, m in layers.items() if n not in kept}
        scores = sensitivity_scan(model, candidates, make, chunks)
        kept |= set(most_sensitive(scores, keep_sensitive))
        report["sensitivity"] = scores
    chosen = [name for name in layers if name not in kept]
    if fmt == "nf4":
        skip = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in chosen]
        model = _nf4_via_transformers(model, skip)
    else:
        replacements = {name: make(name, layers[name]) for name in chosen}  # all valid before any swap
        for name, layer in replacements.items():
            set_module(model, name, layer)
    report.update(quantized_layers=len(chosen), kept_layers=sorted(kept))
    return model, report


def _layer_maker(
    model: nn.Module,
    layers: dict[str, nn.Module],
    fmt: str,
    spec: QuantSpec | None,
    activations: str,
    smooth: float,
    chunks: torch.Tensor | None,
) -> Callable[[str, nn.Module], nn.Module]:
    """``(name, linear) -> quantized replacement`` for ``fmt``; smoothing statistics are gathered once, up front."""
    if spec is not None:
        return lambda name, linear: QuantLinear.from_linear(linear, spec, name)
    if fmt == "nf4":
        return lambda _name, linear: _nf4_layer(linear)
    if activations == "per-tensor":
        return lambda _name, linear: _torch_ao_dynamic(linear)
    if not smooth:
        return lambda _name, linear: DynamicInt8Linear.from_linear(linear)
    if chunks is None:
        raise UserError("dynamic-int8 smoothing needs calibration text", hint="set compress.calibration, or smooth: 0 for per-token scales alone")
    absmax = input_absmax(model, layers, chunks)
    return lambda name, linear: DynamicInt8Linear.from_linear(linear, smoothing_scales(absmax[name], linear.weight, smooth))


def _torch_ao_dynamic(linear: nn.Module) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    linear.qconfig = per_channel_dynamic_qconfig  # per-tensor weight scales cost far more perplexity
    try:
        return DynamicLinear.from_float(linear)
    finally:
        del linear.qconfig


def _nf4_layer(linear: nn.Module) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")  # bitsandbytes quantizes when the parameter moves to a device


def _nf4_via_transformers(model: nn.Module, skip: list[str]) -> nn.Module:
    """Reload ``model`` through transformers' bitsandbytes loader, so it also saves and reloads there."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=[name.replace(".", r"\.") for name in skip],
    )
    with tempfile.TemporaryDirectory(prefix="tunelab-nf4-") as tmp:
        model.save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=config, device_map="cpu", dtype=torch.float32)
