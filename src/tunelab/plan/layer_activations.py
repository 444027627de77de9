"""What autograd keeps from one transformer block's forward pass, tensor by tensor.

Activation memory is not "k x tokens x width": it is the set of tensors the backward pass needs,
and that set changes with which weights train. A frozen linear layer keeps nothing of its input
(its weight gradient is not needed); a trainable one keeps its input; a LoRA adapter keeps its
dropout mask and dropped input, or the shared input when dropout is off; an elementwise product
keeps each factor only if the other one needs a gradient. So the rules below walk the Llama
block in forward order, carrying whether each tensor requires a gradient, and add the bytes of
exactly the tensors PyTorch saves. Under bf16/fp16 autocast every matmul reads a low-precision
copy of its input (one copy per layer that reads it, when the input is fp32) and of each
trainable weight (cached for the whole forward), RMSNorm computes in fp32, and attention runs
on low-precision copies. The rules were checked tensor by tensor against what
``torch.autograd.graph.saved_tensors_hooks`` sees for tiny-llama and SmolLM2 in fp32 and bf16,
full fine-tuning and LoRA (tests/test_plan.py keeps that check).

Attention is the engine's: packed rows run sdpa once per example (``train/varlen_attention.py``),
with the memory-efficient kernel (no ``seq x seq`` scores) from ``MATH_BELOW`` tokens up and, below,
a written-out attention that keeps fp32 copies of the query and keys, the fp32 ``seq x seq``
probabilities, and for the values' product the values and (in bf16/fp16) a low-precision copy of
the probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.plan.architecture import Architecture

#: Examples shorter than this run the written-out attention (``tunelab.train.varlen_attention.MATH_BELOW``;
#: a test keeps the two equal: importing the engine here would import peft for one number).
MATH_BELOW = 128

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


@dataclass(frozen=True)
class BlockRules:
    """How one block trains: which weights, which adapters, which dtypes, how it is split."""

    trainable: bool  # every weight of the block trains (full fine-tuning)
    adapters: frozenset[str]  # block linears with a LoRA adapter
    rank: int  # of the adapters
    dropout: float  # on the adapters' input
    autocast: bool
    compute_bytes: int  # bytes of a matmul operand under the run's precision
    residual_bytes: int  # bytes of the residual stream (fp32: train/frozen_precision.py keeps it so)
    tensor_parallel: int = 1
    seq: int = 2048  # tokens per example (picks the attention kernel)
    #: The MLP runs as one function (``train/fused_mlp.py``: LoRA on its three projections,
    #: weights not split over processes).
    fused_mlp: bool = False
    #: q/k/v run as one function (``train/fused_projections.py``: LoRA on the three, not split).
    fused_qkv: bool = False
    #: The block runs as two functions (``train/fused_block.py``: LoRA on every linear layer, not
    #: split).
    fused_block: bool = False
    #: Its projections run stacked (``train/stacked_projections.py``: frozen weights in the compute
    #: dtype, no adapter dropout): the adapters' A and B are copied into the stacks, not cast and
    #: saved per forward.
    stacked: bool = False


@dataclass(frozen=True)
class BlockActivations:
    """Saved bytes of one block: ``per_token`` scales with the tokens of the micro-batch,
    ``per_block`` does not (autocast's low-precision copies of trainable weights)."""

    per_token: float
    per_block: float
    output_requires_grad: bool

    def bytes(self, tokens: int) -> float:
        return self.per_token * tokens + self.per_block


def block_activations(arch: Architecture, rules: BlockRules, input_requires_grad: bool) -> BlockActivations:
    """Bytes autograd saves for one block whose input does or does not require a gradient."""
    tp = rules.tensor_parallel
    h, q, kv, i = arch.hidden, arch.q_width // tp, arch.kv_width // tp, arch.intermediate // tp
    heads = arch.heads // tp
    cd, res = rules.compute_bytes, rules.residual_bytes
    saved = {"per_token": 0.0, "per_block": 0.0}

    def keep(per_token: float = 0.0, per_block: float = 0.0) -> None:
        saved["per_token"] += per_token
        saved["per_block"] += per_block

    if rules.autocast and not rules.stacked:  # each adapter's A and B cast to the compute dtype, kept for the backward pass
        for name in rules.adapters:
            width_in, width_out = arch.linear_shape(name)
            split_in, split_out = (1, tp) if name in COLUMN_PARALLEL else (tp, 1)
            keep(per_block=cd * rules.rank * (width_in // split_in + width_out // split_out))

    def fused_projections(count: int, width_in: int) -> None:
        """What ``count`` adapted projections computed by one function keep: their input once in the
        compute dtype, each adapter's rank-r product and, with dropout, its boolean mask."""
        keep(cd * width_in + count * cd * rules.rank + (count * width_in if rules.dropout > 0 else 0))

    def fused_mlp() -> None:
        """What the fused gated MLP keeps: its input in the compute dtype, gate, up, the three
        rank-r products and, with dropout, the three boolean masks."""
        keep(cd * h + 2 * cd * i + 3 * cd * rules.rank + (2 * h + i if rules.dropout > 0 else 0))
        if rules.stacked:  # gate and up are column blocks of one product whose last 2r columns stay with them
            keep(2 * cd * rules.rank)

    if rules.fused_block:
        # each half keeps its fp32 input and 1/rms whatever needs a gradient (the first block's too)
        keep(2 * (4 * h + 4))
        fused_projections(3, h)
        if rules.seq < MATH_BELOW:  # padded fp32 queries, keys, probabilities and the values
            keep(4 * (q + kv + heads * rules.seq) + cd * kv)
        else:  # flash attention's query, key, value, output and log-sum-exp per head
            keep(cd * (2 * q + 2 * kv) + 4 * heads)
        fused_projections(1, q)
        fused_mlp()
        return BlockActivations(saved["per_token"], saved["per_block"], True)

    def rms_norm(needs_grad: bool) -> bool:
        if needs_grad:  # the fp32 view (or copy) of the input and 1/rms, for the input's gradient
            keep(4 * h + 4)
        if rules.trainable:  # the normalised input, for the weight's gradient
            keep(res * h)
        return needs_grad or rules.trainable

    def linears(names: tuple[str, ...], width_in: int, in_bytes: int, needs_grad: bool) -> dict[str, bool]:
        """Linear layers reading one tensor; returns whether each output requires a gradient."""
        copy = rules.autocast and in_bytes != cd  # autocast casts the input for every layer that reads it
        shared = False
        for name in names:
            if rules.trainable:
                if copy:
                    keep(cd * width_in)
                else:
                    shared = True
                if rules.autocast:
                    keep(per_block=cd * _split_params(arch, name, tp))
            if name in rules.adapters:
                if rules.dropout > 0:
                    if needs_grad:  # the dropout mask, for the input's gradient (booleans: train/bit_dropout.py)
                        keep(width_in)
                    keep((cd if copy else in_bytes) * width_in)  # the dropped input, for lora_A's gradient
                elif copy:
                    keep(cd * width_in)
                else:
                    shared = True
                keep(cd * rules.rank)  # lora_A's output, for lora_B's gradient
        if shared:
            keep(in_bytes * width_in)
        return {name: needs_grad or rules.trainable or name in rules.adapters for name in names}

    x_grad = input_requires_grad
    y_grad = rms_norm(x_grad)
    if rules.fused_qkv:
        fused_projections(3, h)
        attention_grad = True
    else:
        attention_grad = any(linears(("q_proj", "k_proj", "v_proj"), h, res, y_grad).values())
    if attention_grad:
        if rules.seq < MATH_BELOW:  # fp32 query and keys, fp32 probabilities, and the values' product's inputs
            keep(4 * (q + kv + heads * rules.seq) + cd * kv + (cd * heads * rules.seq if cd != 4 else 0))
        else:  # query, key, value, output and the log-sum-exp per head
            keep(cd * (2 * q + 2 * kv) + 4 * heads)
    o_grad = linears(("o_proj",), q, cd, attention_grad)["o_proj"]
    mid_grad = x_grad or o_grad
    y2_grad = rms_norm(mid_grad)
    if rules.fused_mlp:
        fused_mlp()
        return BlockActivations(saved["per_token"], saved["per_block"], True)
    mlp = linears(("gate_proj", "up_proj"), h, res, y2_grad)
    if mlp["gate_proj"]:
        keep(cd * i)  # silu's input
        keep(cd * i)  # up, for the gradient of silu(gate)
    if mlp["up_proj"]:
        keep(cd * i)  # silu(gate), for the gradient of up
    product_grad = mlp["gate_proj"] or mlp["up_proj"]
    down_grad = linears(("down_proj",), i, cd, product_grad)["down_proj"]
    return BlockActivations(saved["per_token"], saved["per_block"], mid_grad or down_grad)


def backward_working_bytes(arch: Architecture, rules: BlockRules) -> float:
    """Gradients alive at once inside one block's backward, per token: the gated MLP's three
    intermediate gradients and the residual gradient coming in and going out."""
    tp = rules.tensor_parallel
    return 3 * rules.compute_bytes * (arch.intermediate // tp) + 2 * rules.residual_bytes * arch.hidden


def _split_params(arch: Architecture, name: str, tp: int) -> int:
    width_in, width_out = arch.linear_shape(name)
    return width_in * width_out // tp
