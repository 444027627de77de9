"""Saving and reloading compressed models.

Pruned (masked or physically shrunk) and NF4 models are ordinary Hugging Face directories: they
reload with plain ``transformers`` (NF4 needs bitsandbytes installed). Packed weight-only, dynamic
int8 and sparse-input layers, and floored ReLUs (``method.activation.floor``), have no
``transformers`` equivalent, so tunelab writes the config, the
tokenizer, the tensors and a manifest ``tunelab_compression.json`` naming each quantized layer;
:func:`load_compressed` rebuilds the architecture without allocating float weights (so the
reloaded model is as small in RAM as on disk) and loads the tensors into it. The manifest's
``loader`` field says which of the two applies.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab import atomic
from tunelab.activations import FlooredReLU
from tunelab.compress.int8_dynamic import DynamicInt8Linear
from tunelab.compress.modules import set_module
from tunelab.compress.qlinear import QuantLinear, QuantSpec
from tunelab.compress.sparse_layers import SparseGatedMLP, SparseInputLinear
from tunelab.errors import UserError

MANIFEST = "tunelab_compression.json"


def _torch_ao_dynamic_linear() -> type:
    from torch.ao.nn.quantized.dynamic import Linear

    return Linear


def quantized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Description of every layer plain ``transformers`` cannot rebuild from the config (tunelab's
    quantized and sparse layers, floored ReLUs), by name."""
    torch_ao = _torch_ao_dynamic_linear()
    found: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, DynamicInt8Linear, SparseInputLinear, SparseGatedMLP)):
            found[name] = module.describe()
        elif isinstance(module, FlooredReLU):  # the config says relu; the floors live here
            found[name] = {"format": "floored-relu", "channels": module.floor.numel()}
        elif isinstance(module, torch_ao):
            found[name] = {"format": "dynamic-int8", "activations": "per-tensor", "in_features": module.in_features,
                           "out_features": module.out_features, "bias": module.bias() is not None}
    return found


def save_compressed(model: nn.Module, tokenizer: Any, directory: str | Path, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` to ``directory`` atomically; returns the manifest written next to it."""
    layers = quantized_layers(model)
    manifest: dict[str, Any] = {"loader": "tunelab" if layers else "transformers", **(info or {})}
    with atomic.directory(directory) as tmp:
        tokenizer.save_pretrained(tmp)
        if not layers:
            model.save_pretrained(tmp)
        else:
            head = model.get_output_embeddings()
            if head is not None and not isinstance(head, nn.Linear):
                model.config.tie_word_embeddings = False  # a quantized head no longer shares the embedding
            model.config.architectures = [type(model).__name__]  # what save_pretrained records; the loader rebuilds this class
            model.config.save_pretrained(tmp)
            state = _untied_state(model)
            if any(d["format"] == "dynamic-int8" and d.get("activations") == "per-tensor" for d in layers.values()):
                torch.save(state, tmp / "model.pt")  # torch.ao's packed int8 params are not plain tensors
            else:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
            manifest["layers"] = layers
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_compressed(directory: str | Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Reload a model written by :func:`save_compressed` (or any HF causal-LM directory)."""
    from transformers import AutoConfig, AutoTokenizer

    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise UserError("not a saved model directory (no config.json)", where=str(directory))
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"loader": "transformers"}
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    config = AutoConfig.from_pretrained(str(directory))
    cls = _model_class(config)
    if manifest["loader"] == "transformers":
        placement = {"device_map": "cpu"} if getattr(config, "quantization_config", None) else {}
        return cls.from_pretrained(str(directory), **placement), tokenizer, manifest
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device: no float copy is ever allocated
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    for name, layer in manifest["layers"].items():
        set_module(model, name, _empty_layer(layer, name))
    if (directory / "model.pt").exists():
        state = torch.load(directory / "model.pt", weights_only=False)
    else:
        state = load_file(str(directory / "model.safetensors"))
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in result.missing_keys if getattr(model.get_parameter(k), "is_meta", False)]
    if missing or result.unexpected_keys:
        raise UserError(f"saved tensors do not match the model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})", where=str(directory))
    return model.eval(), tokenizer, manifest


def _model_class(config: Any) -> type:
    """The saved model's own class (a classifier stays a classifier), else the causal-LM auto class."""
    import transformers

    names = getattr(config, "architectures", None) or []
    return getattr(transformers, names[0]) if names and hasattr(transformers, names[0]) else transformers.AutoModelForCausalLM


def _empty_layer(layer: dict[str, Any], name: str) -> nn.Module:
    if layer["format"] == "dynamic-int8" and layer.get("activations", "per-tensor") == "per-tensor":  # torch.ao (older manifests say nothing)
        return _torch_ao_dynamic_linear()(layer["in_features"], layer["out_features"], bias_=layer["bias"])
    if layer["format"] == "floored-relu":
        return FlooredReLU(layer["channels"])
    if layer["format"] == "sparse-gated-mlp":
        return SparseGatedMLP(layer["hidden"], layer["intermediate"], layer["act"], layer.get("weights", "fp32"), layer.get("floored", False))
    if layer["format"] == "sparse-input":
        return SparseInputLinear(layer["in_features"], layer["out_features"], bias=layer["bias"], weights=layer["weights"])
    if layer["format"] == "dynamic-int8":
        return DynamicInt8Linear(layer["in_features"], layer["out_features"], bias=layer["bias"], smoothed=layer["smoothed"])
    fields = {k: layer[k] for k in asdict(QuantSpec("int8")) if k in layer}
    return QuantLinear(layer["in_features"], layer["out_features"], QuantSpec(**fields), bias=layer["bias"], where=name)


def _untied_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (tied embeddings are re-tied on load).

    The per-module version metadata is kept: quantized modules need it to read their own state.
    """
    seen: set[int] = set()
    full = model.state_dict()
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    state._metadata = full._metadata  # type: ignore[attr-defined]
    for key, value in full.items():
        if isinstance(value, torch.Tensor) and not value.is_quantized:
            pointer = value.untyped_storage().data_ptr()
            if pointer in seen:
                continue
            seen.add(pointer)
        state[key] = value
    return state
