"""``method.student``: a smaller student built from the model being loaded (the teacher), by
dropping transformer blocks, head groups and MLP channels, or narrowing its configuration, and
keeping as much of the teacher's weights as the new shape holds.

Dropping every other block (DistilBERT), the middle ones, or the ones that change the hidden
states least (Block Influence) keeps the embeddings, the final norm, the LM head and the kept
blocks exactly as the teacher trained them, so the student starts from the teacher's knowledge
instead of from scratch; distillation (``objective: {name: kd_logits}``, whose teacher defaults to
``model.name``) then teaches it to make up for what is missing. Heads and channels are removed by
the structured pruning ``tunelab compress`` uses; a narrower config takes the leading slices of
the teacher's tensors (``tunelab.distill.student_shape``).

The student is an ordinary Hugging Face model of the same class with a smaller config, so it
saves, reloads and exports like any other; what was measured to build it is recorded so it can
be rebuilt exactly. A teacher that is a LoRA run is merged first. Applied before every other
method (order 5): adapters and freezing act on the student.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from tunelab.compress import structured
from tunelab.compress.calibration import block_influence, read_texts, token_chunks
from tunelab.config_base import Section
from tunelab.distill.student_shape import StudentShape, build, finish
from tunelab.errors import UserError
from tunelab.methods.base import Method, MethodContext, register_method
from tunelab.methods.blocks import block_list, drop_blocks
from tunelab.methods.peft_adapters import merge_adapters, unwrap_peft

#: Where a run directory's ``final/`` records the student's shape.
SHAPE_FILE = "student.json"


class StudentConfig(Section):
    """Which of the teacher's blocks the student keeps, and how much narrower it is."""

    keep: Literal["every_other", "ends", "layers", "importance", "all"] = Field(
        "every_other",
        description="every_other: blocks 0, 2, 4, ... (DistilBERT); ends: the first and last halves of num_layers "
        "(the middle blocks change the residual stream least); layers: the blocks listed in layers; importance: the "
        "num_layers blocks that change the hidden states most on the calibration text (ShortGPT's Block Influence); all.",
    )
    num_layers: int | None = Field(None, gt=0, description="Blocks the student keeps (ends, importance); default: half the teacher's.")
    layers: list[int] | None = Field(None, description="0-based teacher blocks to keep, in order (keep: layers).")
    mlp_fraction: float | None = Field(None, gt=0, lt=1, description="Share of every kept block's MLP channels to remove (the least important).")
    head_fraction: float | None = Field(None, gt=0, lt=1, description="Share of every kept block's key/value head groups to remove.")
    calibration: str | None = Field(
        None, description="Text file the importance of blocks, channels and heads is measured on (keep: importance needs it; "
        "without it channels and heads are ranked by weight norms).",
    )
    calibration_chunks: int = Field(16, gt=0, description="Calibration sequences of 256 tokens.")
    config: dict[str, int] | None = Field(
        None, description="A narrower configuration (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim); "
        "its weights are the leading slices of the teacher's (init: teacher) or random (init: random).",
    )
    init: Literal["teacher", "random"] = Field("teacher", description="Where a config-changed student's weights come from.")

    @model_validator(mode="after")
    def _consistent(self) -> StudentConfig:
        if (self.keep == "layers") != (self.layers is not None):
            raise ValueError("give layers: [...] exactly when keep: layers")
        if self.keep == "importance" and self.calibration is None:
            raise ValueError("keep: importance measures the blocks on text: set calibration (e.g. examples/data/heldout/calibration.txt)")
        if self.init == "random" and not self.config:
            raise ValueError("init: random builds a fresh model from config: give config (e.g. {hidden_size: 384})")
        return self


#: Tokens per calibration sequence.
CALIBRATION_LENGTH = 256


def kept_blocks(cfg: StudentConfig, depth: int, influence: torch.Tensor | None = None) -> list[int]:
    """The teacher blocks (0-based) a student of ``cfg`` keeps, from a teacher of ``depth`` blocks
    (``influence``: each block's measured Block Influence, for ``keep: importance``)."""
    if cfg.keep == "every_other":
        return list(range(0, depth, 2))
    if cfg.keep == "all":
        return list(range(depth))
    if cfg.keep in ("ends", "importance"):
        n = cfg.num_layers or max(1, depth // 2)
        if n > depth:
            raise UserError(f"the student cannot keep {n} of the teacher's {depth} blocks", where="method.student.num_layers")
        if cfg.keep == "importance":
            assert influence is not None
            return sorted(influence.topk(n).indices.tolist())
        first = (n + 1) // 2
        return list(range(first)) + list(range(depth - (n - first), depth))
    chosen = list(cfg.layers or [])
    bad = [i for i in chosen if not 0 <= i < depth]
    if bad or len(set(chosen)) != len(chosen) or not chosen:
        raise UserError(f"layers {chosen} must be distinct blocks of 0..{depth - 1}", where="method.student.layers")
    return chosen


def shrink(model: torch.nn.Module, cfg: StudentConfig, ctx: MethodContext) -> StudentShape:
    """Drop the teacher's blocks, head groups and MLP channels that ``cfg`` asks for, in place,
    measuring importance where it needs to (channels and heads are ranked on the kept blocks, in the
    model as it is by then); returns the choices made."""
    chunks = _calibration_chunks(cfg, ctx) if cfg.calibration else None
    _, blocks = block_list(model)
    influence = block_influence(model, blocks, chunks) if cfg.keep == "importance" else None
    shape = StudentShape(kept_blocks(cfg, len(blocks), influence), config=cfg.config, init=cfg.init)
    drop_blocks(model, shape.blocks_kept)
    if cfg.head_fraction:
        groups = _kept_count(model.config.num_key_value_heads, cfg.head_fraction, "head_fraction")
        shape.head_groups = structured.rank_head_groups(model, groups, chunks)
        structured.keep_head_groups(model, shape.head_groups)
    if cfg.mlp_fraction:
        channels = _kept_count(model.config.intermediate_size, cfg.mlp_fraction, "mlp_fraction")
        shape.mlp_channels = structured.rank_mlp_channels(model, channels, chunks)
        structured.keep_mlp_channels(model, shape.mlp_channels)
    return shape


def _kept_count(total: int, fraction: float, key: str) -> int:
    keep = total - math.floor(fraction * total + 0.5)
    if not 0 < keep < total:
        raise UserError(f"removing {fraction} of {total} leaves {keep}", where=f"method.student.{key}", hint=f"choose a share that removes some but not all of {total}")
    return keep


def _calibration_chunks(cfg: StudentConfig, ctx: MethodContext) -> torch.Tensor:
    if ctx.tokenizer is None:
        raise UserError("measuring a student's blocks needs the teacher's tokenizer, which this model did not come with", where="method.student.calibration")
    return token_chunks(ctx.tokenizer, read_texts(cfg.calibration), CALIBRATION_LENGTH, cfg.calibration_chunks)  # type: ignore[arg-type]


@register_method
class StudentMethod(Method):
    key = "student"
    Config = StudentConfig
    order = 5

    def apply(self, model: torch.nn.Module, cfg: StudentConfig, ctx: MethodContext) -> torch.nn.Module:
        model = merge_adapters(model)  # a fine-tuned LoRA teacher: the student inherits its merged weights
        model.requires_grad_(True)  # a run directory loads frozen; the methods after this one decide what trains
        with torch.no_grad():
            shape = shrink(model, cfg, ctx)
        return finish(model, shape)

    def save(self, model: torch.nn.Module, cfg: Any, directory: Path) -> list[str]:
        """The student's shape, so a run that saved only adapters rebuilds the same student."""
        unwrap_peft(model).tunelab_student_shape.save(directory / SHAPE_FILE)
        return [SHAPE_FILE]

    def load(self, model: torch.nn.Module, cfg: Any, directory: Path, ctx: MethodContext) -> torch.nn.Module:
        """A student saved whole (``final/model``) loads already built; one trained with frozen
        blocks saved only its adapters, so its base (the teacher) is turned into the same student again."""
        if getattr(unwrap_peft(model).config, "tunelab_student_of", None) is not None:
            return model
        model = merge_adapters(model)
        return build(model, StudentShape.read(directory / SHAPE_FILE))
