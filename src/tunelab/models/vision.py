"""Vision-language models in the LLaVA shape: a vision tower, a projector into the language
model's embedding space, and the language model, as transformers' own classes.

tunelab trains them as causal LMs whose batches also carry ``pixel_values``: the model replaces
each image placeholder token's embedding by one projected image feature, so a tokenized example
holds ``tokens_per_image`` placeholder tokens per image (``ImageInputs.expand``). What is needed
to turn an image into model input (the image processor, the placeholder token, how many
features one image yields) travels with the model object (``image_inputs``), because every save
path already handles the model and the tokenizer; ``save_image_processor`` writes it beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tunelab.errors import UserError

#: Model types whose images are one fixed-size feature sequence each, placed at one placeholder
#: token (LLaVA-1/1.5); LLaVA-NeXT's tiling and other families' image markers are not handled.
LLAVA_TYPES = ("llava",)

#: The attribute of a loaded VLM that holds its image processor (a plain attribute: not a module,
#: not saved in the state dict).
PROCESSOR_ATTRIBUTE = "tunelab_image_processor"


def is_vision_language(config: Any) -> bool:
    """True for a config with a vision tower and a language model (LLaVA and its relatives)."""
    return getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None


def image_token_id(config: Any) -> int:
    token = getattr(config, "image_token_id", None)
    return int(token if token is not None else config.image_token_index)


def vlm_parts(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``vision_tower``, ``projector`` and ``language_model`` (with the LM head) of a LLaVA-style
    model, found through any wrapper that exposes ``get_base_model`` (peft)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type not in LLAVA_TYPES:
        raise UserError(f"{type(inner).__name__} ({model_type}) is not a LLaVA model: tunelab trains 'llava' vision-language models", hint="other families tile and mark images their own way; use a LlavaForConditionalGeneration checkpoint, or assemble one with `tunelab vlm assemble`")
    core = getattr(inner, "model", inner)
    missing = [name for name in ("vision_tower", "multi_modal_projector", "language_model") if not isinstance(getattr(core, name, None), torch.nn.Module)]
    if missing:
        raise UserError(f"{type(inner).__name__} is not a LLaVA-style vision-language model (no {missing[0]})", hint="use a LlavaForConditionalGeneration checkpoint, or assemble one with `tunelab vlm assemble`")
    parts = {"vision_tower": core.vision_tower, "projector": core.multi_modal_projector, "language_model": core.language_model}
    head = getattr(inner, "lm_head", None)
    if isinstance(head, torch.nn.Module):
        parts["lm_head"] = head
    return parts


def attach_image_processor(model: torch.nn.Module, directory: Path) -> None:
    """Load the directory's image processor onto ``model`` (a VLM folder without one is an error)."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"vision-language model without an image processor ({str(exc).splitlines()[0][:100]})", where=str(directory),
            hint="add its preprocessor_config.json (save it with the image processor's save_pretrained)",
        ) from None
    setattr(model, PROCESSOR_ATTRIBUTE, processor)


def save_image_processor(model: torch.nn.Module, directory: Path) -> None:
    """Write ``model``'s image processor into ``directory`` (nothing for a text-only model)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    processor = getattr(inner, PROCESSOR_ATTRIBUTE, None)
    if processor is not None:
        processor.save_pretrained(str(directory))


@dataclass
class ImageInputs:
    """How images become a VLM's input: pixel tensors and placeholder tokens."""

    processor: Any
    token_id: int
    placeholder: str
    tokens_per_image: int

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """``[n_images, 3, H, W]`` float32, as the model's image processor prepares them."""
        return self.processor(images=images, return_tensors="pt")["pixel_values"].float()

    def expand_ids(self, ids: list[int]) -> list[int]:
        """A prompt's ids with each placeholder repeated ``tokens_per_image`` times."""
        return [t for token in ids for t in ([token] * self.tokens_per_image if token == self.token_id else [token])]

    def expand(self, ids: list[int], labels: list[int], ignore: int) -> tuple[list[int], list[int]]:
        """Each placeholder token repeated ``tokens_per_image`` times; none of them is a target
        (an image feature has no token to predict)."""
        out_ids: list[int] = []
        out_labels: list[int] = []
        for token, label in zip(ids, labels, strict=True):
            if token == self.token_id:
                out_ids += [token] * self.tokens_per_image
                out_labels += [ignore] * self.tokens_per_image
            else:
                out_ids.append(token)
                out_labels.append(label)
        return out_ids, out_labels


def image_inputs(model: torch.nn.Module, tokenizer: Any) -> ImageInputs | None:
    """The model's ``ImageInputs``, or None for a text-only model.

    The number of features per image is measured with one blank image through the model's own
    ``get_image_features``, so any vision tower and feature-selection strategy is counted right.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None or not is_vision_language(config):
        return None
    cached = getattr(inner, "_tunelab_image_inputs", None)
    if cached is not None:
        return cached
    vlm_parts(inner)  # other VLM families expand their images differently (tiling, special tokens)
    processor = getattr(inner, PROCESSOR_ATTRIBUTE, None)
    if processor is None:
        raise UserError(f"{type(inner).__name__} was loaded without its image processor", hint="load it with tunelab.models.load.load_model")
    token = image_token_id(config)
    placeholder = tokenizer.convert_ids_to_tokens(token)
    inputs = ImageInputs(processor, token, placeholder, 0)
    blank = Image.new("RGB", (32, 32), "white")
    param = next(inner.parameters())
    with torch.no_grad():
        features = inner.get_image_features(pixel_values=inputs.pixel_values([blank]).to(param.device, param.dtype))
    features = getattr(features, "pooler_output", features)
    features = features[0] if isinstance(features, (list, tuple)) else features
    inputs.tokens_per_image = int(features.reshape(-1, features.shape[-1]).shape[0])
    inner._tunelab_image_inputs = inputs  # measured once per loaded model
    return inputs
