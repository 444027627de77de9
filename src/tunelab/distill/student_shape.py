"""The shape of a student built from its teacher, chosen once and replayable exactly.

A student differs from its teacher by which blocks it keeps, which MLP channels and attention
head groups each kept block keeps (the structured pruning that ``tunelab compress`` uses), and
optionally a narrower configuration whose weights are *selected* from the teacher's (leading
slices of every tensor, "weight selection", Xu et al. 2024) or initialised at random. The choices
that need measurements (block importance, channel importance) are made once and written down as a
``StudentShape``, so a run that saved only adapters rebuilds the identical student from its
teacher without recomputing them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tunelab.compress import structured
from tunelab.errors import UserError
from tunelab.methods.blocks import drop_blocks

#: Config keys a fresh student may change: its widths. Depth is chosen by which blocks it keeps.
WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")


@dataclass
class StudentShape:
    """Everything that turns the teacher into this student."""

    blocks_kept: list[int]
    mlp_channels: list[list[int]] | None = None
    head_groups: list[list[int]] | None = None
    config: dict[str, int] | None = None
    init: str = "teacher"

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: Path) -> StudentShape:
        return cls(**json.loads(path.read_text()))


def build(model: torch.nn.Module, shape: StudentShape) -> torch.nn.Module:
    """The student of a recorded ``shape`` from its teacher ``model``."""
    drop_blocks(model, shape.blocks_kept)
    if shape.head_groups is not None:
        structured.keep_head_groups(model, shape.head_groups)
    if shape.mlp_channels is not None:
        structured.keep_mlp_channels(model, shape.mlp_channels)
    return finish(model, shape)


def finish(model: torch.nn.Module, shape: StudentShape) -> torch.nn.Module:
    """The last step of building: the narrower config (a new model) if any, and the record of what
    the student is (a summary in its config, the whole shape on the object for ``save``)."""
    if shape.config:
        model = narrower(model, shape.config, from_teacher=shape.init == "teacher")
    model.config.tunelab_student_of = {
        "blocks_kept": shape.blocks_kept, "intermediate_size": getattr(model.config, "intermediate_size", None),
        "num_attention_heads": model.config.num_attention_heads, "hidden_size": model.config.hidden_size, "init": shape.init,
    }
    model.tunelab_student_shape = shape
    return model


def narrower(teacher: torch.nn.Module, overrides: dict[str, int], *, from_teacher: bool) -> torch.nn.Module:
    """A model of the teacher's class with ``overrides`` in its config; every tensor that fits is
    the leading slice of the teacher's tensor of the same name (the same indices in every layer,
    so the residual stream's first ``hidden_size`` features stay aligned end to end)."""
    unknown = sorted(set(overrides) - set(WIDTH_KEYS))
    if unknown:
        raise UserError(f"a student's config may change {', '.join(WIDTH_KEYS)}; not {', '.join(unknown)}", where="method.student.config",
                        hint="choose the depth with keep / num_layers / layers")
    config = teacher.config.to_dict()
    if "head_dim" not in overrides and ("hidden_size" in overrides or "num_attention_heads" in overrides):
        config.pop("head_dim", None)  # derived again from the new hidden size and head count
    config.update(overrides)
    new_config = type(teacher.config).from_dict(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a random student is the same student every time it is rebuilt
        student = AutoModelForCausalLM.from_config(new_config, torch_dtype=next(teacher.parameters()).dtype)
    if from_teacher:
        source = teacher.state_dict()
        with torch.no_grad():
            for name, tensor in student.state_dict().items():
                old = source.get(name)
                if old is not None and old.dim() == tensor.dim() and all(n <= o for n, o in zip(tensor.shape, old.shape)):
                    tensor.copy_(old[tuple(slice(0, n) for n in tensor.shape)])
    student.generation_config = teacher.generation_config
    return student

