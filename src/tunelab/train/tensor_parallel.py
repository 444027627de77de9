"""Megatron-style tensor parallelism on DTensor: ``train.distributed.strategy: tp`` (and ``fsdp+tp``).

Each transformer block's matrices split over the tensor-parallel processes the way Megatron-LM
splits them: the projections that fan out (q/k/v, gate/up; BLOOM's fused query_key_value and
dense_h_to_4h) by output features (``ColwiseParallel``), the ones that fan back in (o/down,
BLOOM's dense and dense_4h_to_h) by input features (``RowwiseParallel``, one all-reduce), so a
block costs two all-reduces forward and two backward and each process holds 1/N of its weights
and computes 1/N of its heads. The embedding and LM head split by vocabulary; the logits are
gathered whole for the loss. Norms and biases of row-split layers stay whole on every process.

The plan comes from the model: transformers' own ``base_model_tp_plan`` (Llama, Mistral, Qwen2,
...) or ours for architectures it lacks (BLOOM). A layer a method wrapped (LoRA) splits as the
method says (``Method.tensor_parallel_parts``); anything else in the plan that is not a plain
``nn.Linear`` is refused by name, never split blindly.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from tunelab.errors import UserError
from tunelab.methods.base import METHODS
from tunelab.methods.peft_adapters import unwrap_peft

#: Plans for architectures whose transformers config has none (names relative to the base model).
_OWN_PLANS: dict[str, dict[str, str]] = {
    "bloom": {
        "h.*.self_attention.query_key_value": "colwise",  # heads are contiguous: [head][q,k,v][head_dim]
        "h.*.self_attention.dense": "rowwise",
        "h.*.mlp.dense_h_to_4h": "colwise",
        "h.*.mlp.dense_4h_to_h": "rowwise",
    },
}


def block_plan(model: torch.nn.Module) -> dict[str, str]:
    """{module name pattern relative to the base model: "colwise" | "rowwise"} for ``model``."""
    config = unwrap_peft(model).config
    plan = dict(getattr(config, "base_model_tp_plan", None) or _OWN_PLANS.get(config.model_type, {}))
    if not plan:
        raise UserError(f"no tensor-parallel plan for {config.model_type} models yet (Llama-family and BLOOM have one)",
                        where="train.distributed.strategy", hint="use strategy: fsdp for this model")
    unknown = {name: style for name, style in plan.items() if style not in ("colwise", "rowwise")}
    if unknown:
        name, style = next(iter(unknown.items()))
        raise UserError(f"{config.model_type}'s tensor-parallel plan splits {name} as {style!r}, which tunelab does not apply yet",
                        where="train.distributed.strategy", hint="use strategy: fsdp for this model")
    return plan


def check_heads_divide(model: torch.nn.Module, degree: int) -> None:
    """Each process computes whole attention heads: the head counts must divide by the degree."""
    config = unwrap_peft(model).config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for what, count in (("attention heads", heads), ("key/value heads", kv_heads)):
        if count is not None and count % degree:
            raise UserError(f"the model's {count} {what} do not split over {degree} tensor-parallel processes",
                            where="train.distributed.tp.degree", hint=f"use a degree that divides {count}, or strategy fsdp")


def _styles(model: torch.nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """{full module name: style} for every layer ``plan`` names, through method wrappers."""
    patterns = [(re.compile(r"(^|\.)" + re.escape(pattern).replace(r"\*", r"\d+") + "$"), style) for pattern, style in plan.items()]
    styles: dict[str, str] = {}
    for name, module in model.named_modules():
        style = next((style for pattern, style in patterns if pattern.search(name)), None)
        if style is None:
            continue
        if type(module) is torch.nn.Linear:
            styles[name] = style
            continue
        parts = next((parts for key in METHODS if (parts := METHODS.get(key).tensor_parallel_parts(module, style)) is not None), None)
        if parts is None or any(type(module.get_submodule(part)) is not torch.nn.Linear for part in parts):
            raise UserError(f"tensor parallelism cannot split {name}: it is a {type(module).__name__}, not a Linear layer or a LoRA layer over one",
                            where="train.distributed.strategy", hint="full fine-tuning and LoRA work under tp; use strategy fsdp for this method")
        styles.update({f"{name}.{part}": part_style for part, part_style in parts.items()})
    if not styles:
        raise UserError("the tensor-parallel plan matched no layer of this model", where="train.distributed.strategy", hint="use strategy fsdp")
    return styles


def _vocabulary_layers(model: torch.nn.Module) -> dict[str, Any]:
    """The input embedding (split by vocabulary rows, partial lookups summed) and the LM head
    (split by vocabulary columns, logits gathered whole) when they are plain layers."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    inner = unwrap_peft(model)
    names = {id(module): name for name, module in model.named_modules()}
    styles: dict[str, Any] = {}
    embedding, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    if type(embedding) is torch.nn.Embedding:
        styles[names[id(embedding)]] = RowwiseParallel(input_layouts=Replicate())
    if type(head) is torch.nn.Linear:
        styles[names[id(head)]] = ColwiseParallel(output_layouts=Replicate())
    return styles


def _local_heads_for_bloom(model: torch.nn.Module, rank: int, degree: int) -> None:
    """BLOOM's attention reshapes by its head count and adds an ALiBi bias built for every head:
    each process keeps its own heads' count and slice of the bias."""
    from transformers.models.bloom.modeling_bloom import BloomAttention

    def own_heads(module: BloomAttention, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        alibi = kwargs["alibi"]
        per_row = alibi.view(-1, module.num_heads * degree, *alibi.shape[1:])
        kwargs["alibi"] = per_row[:, rank * module.num_heads:(rank + 1) * module.num_heads].reshape(-1, *alibi.shape[1:])
        return args, kwargs

    for module in model.modules():
        if isinstance(module, BloomAttention):
            module.num_heads //= degree
            module.register_forward_pre_hook(own_heads, with_kwargs=True)


def parallelize(model: torch.nn.Module, mesh: Any) -> None:
    """Split ``model``'s layers over ``mesh`` (1-D, the tensor-parallel processes) in place."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    degree = mesh.size()
    check_heads_divide(model, degree)
    inner = unwrap_peft(model)
    tied = inner.get_output_embeddings() is not None and inner.get_output_embeddings().weight is inner.get_input_embeddings().weight
    build = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {name: build[style]() for name, style in _styles(model, block_plan(model)).items()}
    parallelize_module(model, mesh, {**plan, **_vocabulary_layers(model)})
    if tied:  # both split their vocabulary rows the same way: one parameter again
        inner.get_output_embeddings().weight = inner.get_input_embeddings().weight
    if inner.config.model_type == "bloom":
        _local_heads_for_bloom(model, mesh.get_local_rank(), degree)
