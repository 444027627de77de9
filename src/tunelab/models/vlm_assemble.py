"""Assemble a LLaVA-style vision-language model from a language model and a vision encoder.

Offline there is no pretrained VLM to start from, but there are parts: any causal LM tunelab
loads (the packaged SmolLM2) and a CLIP vision tower (one tunelab pretrained contrastively,
``tunelab vlm encoder``, or any saved ``CLIPVisionModel``/``SiglipVisionModel``). The result is
a plain ``LlavaForConditionalGeneration`` folder that transformers loads with its own class: the
LM's weights, the vision tower's weights, a freshly initialised projector (a 2-layer GELU MLP,
or a linear one), and the tokenizer with one new ``<image>`` placeholder token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from tunelab import atomic
from tunelab.errors import UserError

IMAGE_TOKEN = "<image>"
Projector = Literal["mlp", "linear"]


def _vision_tower(directory: Path) -> tuple[torch.nn.Module, Any, Any]:
    """The vision model (without any contrastive projection), its config and image processor."""
    if not (directory / "config.json").exists():
        raise UserError("not a saved vision encoder (no config.json)", where=str(directory), hint="train one with `tunelab vlm encoder`, or point at a CLIP/SigLIP vision model folder")
    config = AutoConfig.from_pretrained(str(directory))
    vision_config = getattr(config, "vision_config", config)  # a full CLIP folder holds both towers
    if not hasattr(vision_config, "image_size") or not hasattr(vision_config, "patch_size"):
        raise UserError(f"{type(config).__name__} is not a vision encoder config", where=str(directory))
    model = AutoModel.from_pretrained(str(directory))
    body = getattr(model, "vision_model", model)
    try:
        processor = AutoImageProcessor.from_pretrained(str(directory))
    except (OSError, ValueError):
        raise UserError("the vision encoder has no image processor (preprocessor_config.json)", where=str(directory)) from None
    return body, vision_config, processor


def assemble_vlm(language_model: torch.nn.Module, tokenizer: Any, vision_dir: Path, out: Path, *, projector: Projector = "mlp", seed: int = 0, sources: dict[str, str] | None = None) -> Path:
    """Write a ``LlavaForConditionalGeneration`` folder to ``out`` (atomically) and return it.

    The projector maps the vision tower's last-layer patch features (the CLS token dropped, as
    LLaVA's ``default`` strategy does) into the LM's embedding space; ``linear`` keeps
    transformers' two layers but with an identity activation, so the class and its checkpoints
    stay the standard ones and the map is linear.
    """
    vision_body, vision_config, processor = _vision_tower(vision_dir)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    text_config = language_model.config
    config = LlavaConfig(
        vision_config=vision_config.to_dict() | {"model_type": vision_config.model_type},
        text_config=text_config.to_dict() | {"model_type": text_config.model_type},
        image_token_id=token_id,
        projector_hidden_act="gelu" if projector == "mlp" else "linear",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vlm = LlavaForConditionalGeneration(config)
    core = vlm.model
    core.language_model.load_state_dict(language_model.get_decoder().state_dict())
    vlm.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    getattr(core.vision_tower, "vision_model", core.vision_tower).load_state_dict(vision_body.state_dict())
    vlm.tie_weights()
    with atomic.directory(out) as tmp:
        vlm.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        parts = {"projector": projector, "image_token": IMAGE_TOKEN, "image_token_id": token_id, "tokens_per_image": config.image_seq_length, **(sources or {})}
        (tmp / "vlm_parts.json").write_text(json.dumps(parts, indent=1) + "\n")
    return out
