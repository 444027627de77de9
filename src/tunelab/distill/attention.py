"""Attention transfer's machinery, shared by the causal-LM (``kd_attention``) and the encoder
(``kd_embedding``) objectives: the query, key and value projections of chosen blocks, captured by
forward hooks while one forward pass runs, and their relations compared sequence by sequence.

Hooks on the projections (not ``output_attentions``) work with every attention kernel (sdpa,
per-example varlen on packed rows, eager) and cost no extra matmul: the relations are computed
from the captured projections afterwards. A LoRA-wrapped projection is captured with its adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field

from tunelab.config_base import Section
from tunelab.distill.losses import relation_kd, relation_log_probs
from tunelab.errors import UserError
from tunelab.methods.blocks import block_list, sublayer
from tunelab.methods.peft_adapters import unwrap_peft

#: Query, key and value projections per family (Llama-like decoders, BERT encoders).
PROJECTIONS = {
    "q": ("self_attn.q_proj", "attention.self.query"),
    "k": ("self_attn.k_proj", "attention.self.key"),
    "v": ("self_attn.v_proj", "attention.self.value"),
}


def head_counts(model: torch.nn.Module) -> tuple[int, int]:
    """``(query heads, key/value heads)`` from the model's config."""
    config = unwrap_peft(model).config
    heads = int(config.num_attention_heads)
    return heads, int(getattr(config, "num_key_value_heads", None) or heads)


def projections(model: torch.nn.Module, block: int) -> dict[str, torch.nn.Module]:
    """The q/k/v projection modules of block ``block`` (1-based, as hint layers count), or a clear
    error for architectures with fused projections."""
    _, blocks = block_list(model)
    found = {kind: sublayer(blocks[block - 1], paths) for kind, paths in PROJECTIONS.items()}
    if any(module is None for module in found.values()):
        raise UserError(
            f"attention transfer needs separate query/key/value projections; {type(unwrap_peft(model)).__name__} has none it recognises",
            where="objective.name", hint="use kd_logits or kd_hints for this architecture",
        )
    return found  # type: ignore[return-value]


@contextlib.contextmanager
def captured(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """While the context lasts, every forward of ``modules`` stores its output under its name."""
    store: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_hook(_keeper(store, name)) for name, module in modules.items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _keeper(store: dict[str, torch.Tensor], name: str):
    def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
        store[name] = output

    return hook


Relation = Literal["qk", "qq", "kk", "vv"]


class AttentionSettings(Section):
    """Which attention relations a student learns from its teacher (MiniLM, MiniLMv2)."""

    attention_weight: float = Field(1.0, ge=0, description="Weight of the attention-relation term (KL per token).")
    relations: list[Relation] = Field(
        ["qq", "kk", "vv"], min_length=1,
        description="qk: attention maps (same query-head count as the teacher); qq/kk/vv: query/key/value self-relations (MiniLMv2).",
    )
    relation_heads: int | None = Field(
        None, gt=0, description="Heads the qq/kk/vv relations are split into; default: the student's key/value heads."
    )
    layers: Literal["uniform", "last"] | list[tuple[int, int]] = Field(
        "last", description="Which student block learns from which teacher block: last (MiniLM), uniform, or [[student, teacher], ...] (1-based)."
    )


class AttentionTransfer:
    """The student's and the teacher's attention relations on chosen pairs of blocks: capture the
    projections during each model's forward, then compare them sequence by sequence."""

    def __init__(self, settings: AttentionSettings, student: torch.nn.Module, teacher: torch.nn.Module, pairs: list[tuple[int, int]], *, causal: bool):
        if any(s == 0 or t == 0 for s, t in pairs):
            raise UserError("attention pairs name blocks (1-based); 0 is the embeddings, which have no attention", where="objective.layers")
        self.relations, self.pairs, self.causal = settings.relations, pairs, causal
        self.modules = {
            "student": {f"{s}.{kind}": m for s, _ in pairs for kind, m in projections(student, s).items()},
            "teacher": {f"{t}.{kind}": m for _, t in pairs for kind, m in projections(teacher, t).items()},
        }
        self.heads = {"student": head_counts(student), "teacher": head_counts(teacher)}
        self.relation_heads = settings.relation_heads or self.heads["student"][1]
        self._check_heads()
        self.states: dict[str, dict[str, torch.Tensor]] = {}

    def _check_heads(self) -> None:
        student, teacher = self.heads["student"][0], self.heads["teacher"][0]
        if "qk" in self.relations and student != teacher:
            raise UserError(
                f"attention maps (qk) are compared head by head: the student has {student} heads, the teacher {teacher}",
                where="objective.relations", hint="use the qq/kk/vv relations, which any head count can learn",
            )
        kinds = {kind for relation in self.relations if relation != "qk" for kind in relation}
        for side, modules in self.modules.items():
            for name, module in modules.items():
                width = getattr(module, "out_features", None)
                if name.split(".")[1] in kinds and width is not None and width % self.relation_heads:
                    raise UserError(
                        f"the {side}'s {name.split('.')[1]} projection ({width} wide) does not split into {self.relation_heads} relation heads",
                        where="objective.relation_heads", hint="choose a number that divides every projection's width",
                    )

    @contextlib.contextmanager
    def capturing(self, side: str) -> Iterator[None]:
        """Keep ``side``'s (student or teacher) projections from the forward run inside the context."""
        with captured(self.modules[side]) as store:
            yield
        self.states[side] = store

    def _log_relations(self, side: str, block: int, relation: str, row: int, start: int, end: int) -> torch.Tensor:
        a, b = (self.states[side][f"{block}.{kind}"][row, start:end] for kind in relation)
        heads = self.heads[side] if relation == "qk" else (self.relation_heads, self.relation_heads)
        return relation_log_probs(a, b, *heads, causal=self.causal)

    def divergence(self, row: int, start: int, end: int) -> torch.Tensor:
        """KL(teacher ‖ student) of one sequence's relations, summed over its positions and
        averaged over block pairs and relations."""
        total = sum(
            relation_kd(self._log_relations("student", s, r, row, start, end), self._log_relations("teacher", t, r, row, start, end)).sum()
            for s, t in self.pairs for r in self.relations
        )
        return total / (len(self.pairs) * len(self.relations))  # type: ignore[return-value]

    def release(self) -> None:
        """Drop the captured projections (they hold the forward's graph)."""
        self.states.clear()
