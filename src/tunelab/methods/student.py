"""``method.student``: a smaller student built from the model being loaded (the teacher), by
dropping transformer blocks and keeping the rest of the teacher's weights.

Dropping every other block (DistilBERT) or the middle ones keeps the embeddings, the final norm,
the LM head and the kept blocks exactly as the teacher trained them, so the student starts from
the teacher's knowledge instead of from scratch; distillation (``objective: {name: kd_logits}``,
whose teacher defaults to ``model.name``) then teaches it to make up for the missing blocks.

The student is an ordinary Hugging Face model of the same class with ``num_hidden_layers``
lowered, so it saves, reloads and exports like any other. A teacher that is a LoRA run is merged
first. Applied before every other method (order 5): adapters and freezing act on the student.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from tunelab.config_base import Section
from tunelab.errors import UserError
from tunelab.methods.base import Method, MethodContext, register_method
from tunelab.methods.blocks import block_list
from tunelab.methods.peft_adapters import merge_adapters, unwrap_peft


class StudentConfig(Section):
    """Which of the teacher's blocks the student keeps."""

    keep: Literal["every_other", "ends", "layers"] = Field(
        "every_other",
        description="every_other: blocks 0, 2, 4, ... (DistilBERT); ends: the first and last halves of num_layers "
        "(the middle blocks change the residual stream least); layers: the blocks listed in layers.",
    )
    num_layers: int | None = Field(None, gt=0, description="Blocks the student keeps (ends); default: half the teacher's.")
    layers: list[int] | None = Field(None, description="0-based teacher blocks to keep, in order (keep: layers).")

    @model_validator(mode="after")
    def _layers_given(self) -> StudentConfig:
        if (self.keep == "layers") != (self.layers is not None):
            raise ValueError("give layers: [...] exactly when keep: layers")
        return self


def kept_blocks(cfg: StudentConfig, depth: int) -> list[int]:
    """The teacher blocks (0-based) a student of ``cfg`` keeps, from a teacher of ``depth`` blocks."""
    if cfg.keep == "every_other":
        return list(range(0, depth, 2))
    if cfg.keep == "ends":
        n = cfg.num_layers or max(1, depth // 2)
        if n > depth:
            raise UserError(f"the student cannot keep {n} of the teacher's {depth} blocks", where="method.student.num_layers")
        first = (n + 1) // 2
        return list(range(first)) + list(range(depth - (n - first), depth))
    chosen = list(cfg.layers or [])
    bad = [i for i in chosen if not 0 <= i < depth]
    if bad or len(set(chosen)) != len(chosen) or not chosen:
        raise UserError(f"layers {chosen} must be distinct blocks of 0..{depth - 1}", where="method.student.layers")
    return chosen


def drop_blocks(model: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """Keep only blocks ``keep`` of ``model`` (in place), renumbering what indexes blocks: the
    attention layers' ``layer_idx`` (the KV cache slot) and per-layer config lists."""
    name, blocks = block_list(model)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    kept = torch.nn.ModuleList(blocks[i] for i in keep)
    setattr(parent, name.rsplit(".", 1)[-1], kept)
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, len(keep))
    for key in ("layer_types",):  # per-block settings (sliding or full attention) follow their blocks
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == len(blocks):
            setattr(config, key, [values[i] for i in keep])
    return model


@register_method
class StudentMethod(Method):
    key = "student"
    Config = StudentConfig
    order = 5

    def apply(self, model: torch.nn.Module, cfg: StudentConfig, ctx: MethodContext) -> torch.nn.Module:
        model = merge_adapters(model)  # a fine-tuned LoRA teacher: the student inherits its merged weights
        model.requires_grad_(True)  # a run directory loads frozen; the methods after this one decide what trains
        keep = kept_blocks(cfg, len(block_list(model)[1]))
        drop_blocks(model, keep)
        model.config.tunelab_student_of = {"blocks_kept": keep}
        return model

    def load(self, model: torch.nn.Module, cfg: Any, directory: Path, ctx: MethodContext) -> torch.nn.Module:
        """A student saved whole (``final/model``) loads already shrunk; one trained with frozen
        blocks saved only its adapters, so its base (the teacher) is shrunk again here."""
        if getattr(unwrap_peft(model).config, "tunelab_student_of", None) is not None:
            return model
        return self.apply(model, StudentConfig.model_validate(cfg), ctx)
