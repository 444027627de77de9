"""Bytes per parameter by method: what is stored for each group of weights, and what trains.

- ``full``: every weight trains. fp32 master weights, fp32 gradients and the optimizer's moments,
  also under bf16 autocast (the engine keeps trainable weights in fp32).
- ``lora``: the base is frozen; under autocast the engine stores frozen weights in the compute
  dtype (``train/frozen_precision.py``) except under FSDP, which keeps its shards' dtype. The
  adapters (r x (in + out) per adapted linear) train in fp32 with their gradients and moments.
- ``qlora``: as LoRA, with every block linear in bitsandbytes NF4 (``compress/qlora.py``): 4 bits a
  weight plus one fp32 absmax per 64 weights (no double quantization) = 0.5625 bytes; the
  embedding, norms and an untied head stay as LoRA stores them. On a CPU the engine's NF4 model
  also keeps the fp32 file it was reloaded from mapped (below).

Optimizer state: Adam(W) keeps two fp32 moments (8 bytes per trainable parameter), SGD with
momentum one (4). The engine's AdamW is torch's ``foreach`` implementation, whose step allocates
``sqrt(v)`` for every trainable parameter at once: 4 more bytes per trainable parameter for the
duration of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.plan.architecture import BLOCK_LINEARS, Architecture
from tunelab.plan.settings import Settings

NF4_BYTES = 0.5 + 4 / 64
OPTIMIZER_BYTES = {"adamw": 8, "adam": 8, "sgd": 4}
OPTIMIZER_STEP_BYTES = {"adamw": 4, "adam": 4, "sgd": 0}


def adapted_linears(arch: Architecture, settings: Settings) -> frozenset[str]:
    """The block linears LoRA adapts: peft's default for the architecture, all of them, or a list."""
    if settings.method == "full":
        return frozenset()
    targets = settings.adapter_targets
    if targets == "auto":
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS,
        )

        return frozenset(DEFAULTS.get(arch.model_type, ("q_proj", "v_proj")))
    if targets == "all-linear":
        return frozenset(BLOCK_LINEARS)
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = sorted(set(names) - set(BLOCK_LINEARS))
    if unknown:
        from tunelab.errors import UserError

        raise UserError(f"unknown LoRA target {unknown[0]!r}", where="--lora-targets", hint=f"auto, all-linear, or some of {', '.join(BLOCK_LINEARS)}")
    return frozenset(names)


@dataclass(frozen=True)
class ParameterGroup:
    """Parameters stored alike: how many, bytes each as stored, and whether they train."""

    name: str
    count: int
    weight_bytes: float
    trains: bool
    #: Which share of the group one device holds: 'block' (split by tensor parallelism and
    #: spread over pipeline stages) or 'outside' (embedding, norms, head: replicated by TP).
    kind: str = "outside"
    #: Block groups: the share tensor parallelism splits (linears, not norms).
    tp_split: bool = False


def parameter_groups(arch: Architecture, settings: Settings) -> list[ParameterGroup]:
    """The model's parameters grouped by how ``settings.method`` stores and trains them."""
    L, method = arch.layers, settings.method
    frozen_cast = settings.autocast and settings.data_shards == 1
    frozen = settings.compute_bytes if frozen_cast else 4
    if method == "full":
        return [
            ParameterGroup("block linears", L * arch.block_linear_params(), 4, True, "block", True),
            ParameterGroup("block norms", L * 2 * arch.hidden, 4, True, "block"),
            ParameterGroup("embedding, final norm, head", arch.outside_params(), 4, True),
        ]
    linear_bytes = NF4_BYTES if method == "qlora" else frozen
    adapters = sum(settings.adapter_rank * sum(arch.linear_shape(name)) for name in adapted_linears(arch, settings))
    groups = []
    if method == "qlora" and settings.device == "cpu":
        # The NF4 model is reloaded from an fp32 safetensors file that transformers maps into
        # memory; the weights it leaves unquantized are views into that mapping, which stays
        # resident (every page was read to quantize) for as long as they live: measured, the
        # process holds the whole fp32 file beside the NF4 weights.
        groups.append(ParameterGroup("fp32 file the NF4 model was reloaded from (mapped)", arch.total_params(), 4, False))
        frozen = settings.compute_bytes if frozen_cast else 0
    return groups + [
        ParameterGroup("block linears (frozen)", L * arch.block_linear_params(), linear_bytes, False, "block", True),
        ParameterGroup("block norms (frozen)", L * 2 * arch.hidden, frozen, False, "block"),
        ParameterGroup("embedding, final norm, head (frozen)", arch.outside_params(), frozen, False),
        ParameterGroup("LoRA adapters", L * adapters, 4, True, "block", True),
    ]
