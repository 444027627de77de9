"""Peak memory per device of one training step: a pure function of the architecture and settings.

A step's memory is not the sum of its parts: activations are freed as the backward pass builds
the gradients, and the optimizer's temporaries exist only during its step. So the estimate
evaluates the moments that can hold the peak and reports the largest, with its breakdown:

- ``forward``: weights, optimizer state, every saved activation and the loss's temporaries
  (the end of the forward pass, where the fused loss computes its chunks);
- ``backward (loss)``: the same activations and the loss's backward temporaries;
- ``backward (blocks)``: the blocks' activations and one block's working gradients (with
  checkpointing: the blocks' inputs plus the one block being recomputed);
- ``gradients``: the end of the backward pass, every gradient present;
- ``optimizer step``: weights, gradients, moments and the step's own temporaries;
- ``setup``: loading, before the engine casts or shards anything (the model arrives in fp32;
  QLoRA holds it while it reloads as NF4; FSDP loads the whole model in every process before
  sharding it and gathers it whole again for the final save).

Each moment's components add up to its total; ``runtime`` is what the process holds before any
model exists (Python and torch on a CPU, the CUDA context on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.plan.architecture import BLOCK_LINEARS, Architecture
from tunelab.plan.layer_activations import BlockRules, backward_working_bytes, block_activations
from tunelab.plan.loss_memory import loss_memory
from tunelab.plan.methods import (
    OPTIMIZER_BYTES,
    OPTIMIZER_STEP_BYTES,
    adapted_linears,
    parameter_groups,
)
from tunelab.plan.settings import Settings
from tunelab.plan.strategies import (
    ddp_bucket_bytes,
    device_share,
    fsdp_gathered_bytes,
    in_flight_microbatches,
    microbatch_rows,
    stage_blocks,
)

COMPONENTS = ("weights", "gradients", "optimizer_state", "activations", "temporaries", "runtime")


@dataclass(frozen=True)
class Moment:
    """One instant of a step and the bytes each component holds then."""

    name: str
    components: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.components.values())


@dataclass(frozen=True)
class Estimate:
    """The peak moment, every moment considered, and the figures around them (bytes per device)."""

    settings: Settings
    peak: Moment
    moments: list[Moment]
    #: Saved activations of one micro-batch with and without activation checkpointing.
    activations_plain: float
    activations_checkpointed: float
    trainable_params: int
    total_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.peak.total

    @property
    def components(self) -> dict[str, float]:
        return self.peak.components


def estimate(arch: Architecture, settings: Settings) -> Estimate:
    """Bytes per device at each moment of a steady training step (the optimizer state exists)."""
    s = settings
    groups = parameter_groups(arch, s)
    weights = sum(g.count * g.weight_bytes * device_share(g, arch, s) for g in groups)
    trainable = sum(g.count * device_share(g, arch, s) for g in groups if g.trains)
    gradients = 4 * trainable
    optimizer_state = OPTIMIZER_BYTES[s.optimizer] * trainable
    buckets = ddp_bucket_bytes(gradients, s)
    gathered_forward, gathered_backward = fsdp_gathered_bytes(arch, groups, s)

    full = s.method == "full"
    frozen_cast = s.autocast and s.data_shards == 1 and not full
    residual = 4  # fp32 even when the frozen weights are cast (the embedding's output is widened)
    adapters = adapted_linears(arch, s)
    fusable = not full and s.data_shards == 1 and s.tensor_parallel == 1  # the trainer's fused LoRA functions apply
    rules = BlockRules(
        trainable=full, adapters=adapters, rank=s.adapter_rank, dropout=s.adapter_dropout,
        autocast=s.autocast, compute_bytes=s.compute_bytes, residual_bytes=residual,
        tensor_parallel=s.tensor_parallel, seq=s.seq,
        fused_mlp=fusable and {"gate_proj", "up_proj", "down_proj"} <= adapters,
        fused_qkv=fusable and {"q_proj", "k_proj", "v_proj"} <= adapters,
        fused_block=fusable and adapters == frozenset(BLOCK_LINEARS),
        stacked=fusable and adapters == frozenset(BLOCK_LINEARS) and s.adapter_dropout == 0 and (frozen_cast or not s.autocast),
    )
    rows = microbatch_rows(s)
    tokens = rows * s.seq
    supervised = max(1, round(rows * (s.seq - 1) * s.supervised_fraction))
    blocks = stage_blocks(arch, s)
    in_flight = in_flight_microbatches(s)

    first = block_activations(arch, rules, input_requires_grad=full)
    steady = block_activations(arch, rules, input_requires_grad=first.output_requires_grad)
    plain_blocks = first.bytes(tokens) + (blocks - 1) * steady.bytes(tokens)
    inputs_kept = blocks * residual * arch.hidden * tokens  # what checkpointing keeps of each block
    last_grad = steady.output_requires_grad if blocks > 1 else first.output_requires_grad
    final_norm = ((4 * arch.hidden + 4) if last_grad else 0) + (residual * arch.hidden if full else 0)
    embedding_ids = 8 * tokens if full else 0  # the token ids, for the embedding's gradient
    outside = final_norm * tokens + embedding_ids
    head_weight_bytes = s.compute_bytes if frozen_cast else 4  # the head is stored like the embedding: fp32, or cast with the frozen weights
    loss = loss_memory(
        arch, supervised=supervised, fused=s.uses_fused_loss, head_trains=full, hidden_requires_grad=last_grad or full,
        autocast=s.autocast, compute_bytes=s.compute_bytes, residual_bytes=residual, head_weight_bytes=head_weight_bytes,
    )
    activations_plain = in_flight * (plain_blocks + outside) + loss.saved
    activations_checkpointed = in_flight * (inputs_kept + outside) + loss.saved
    working = backward_working_bytes(arch, rules) * tokens

    def moment(name: str, *, grads: float = 0.0, acts: float = 0.0, temps: float = 0.0) -> Moment:
        return Moment(name, {
            "weights": weights, "gradients": grads, "optimizer_state": optimizer_state, "activations": acts,
            "temporaries": temps + buckets, "runtime": float(s.runtime_bytes),
        })

    acts = activations_checkpointed if s.checkpointing else activations_plain
    head_gradient = 4 * arch.vocab * arch.hidden / s.data_shards if full else 0.0  # the loss's backward hands it over first
    blocks_alive = acts - loss.saved  # once the loss's backward has run, its saved tensors are gone
    if s.checkpointing:  # the blocks' inputs plus the one block being recomputed
        blocks_alive += steady.bytes(tokens) if blocks > 1 else first.bytes(tokens)
    moments = [
        moment("forward", acts=acts, temps=loss.forward_transient + gathered_forward),
        moment("backward (loss)", acts=acts, temps=loss.backward_transient + gathered_backward),
        moment("backward (blocks)", grads=head_gradient, acts=blocks_alive, temps=working + gathered_backward),
    ]
    embedding_grad = 4 * arch.embedding_params() / s.data_shards if full else 0.0  # the embedding's dense gradient, added into .grad
    moments.append(moment("gradients", grads=gradients, temps=embedding_grad + gathered_backward))
    moments.append(moment("optimizer step", grads=gradients, temps=OPTIMIZER_STEP_BYTES[s.optimizer] * trainable))
    moments.append(_setup_moment(arch, s, weights, optimizer_state))
    peak = max(moments, key=lambda m: m.total)
    notes = _notes(arch, s)
    return Estimate(
        settings=s, peak=peak, moments=moments, activations_plain=activations_plain,
        activations_checkpointed=activations_checkpointed, trainable_params=sum(g.count for g in groups if g.trains),
        total_params=arch.total_params(), notes=notes,
    )


def _setup_moment(arch: Architecture, s: Settings, weights: float, optimizer_state: float) -> Moment:
    """Loading (and, when the model is split, the final gather): the engine loads every model in
    fp32, whole, in every process, and splits it only then (fsdp, tp, pp); at the end the main
    process gathers the trained model to its CPU beside its own part."""
    loaded = 4.0 * arch.total_params()
    held, opt = loaded, 0.0
    if s.method == "qlora" and s.device == "cpu":
        held = loaded + weights  # the fp32 model is still loaded while the NF4 one reloads from its file
    elif s.method == "qlora" and s.device == "gpu":
        held = weights  # the fp32 model and its NF4 reload stay in host memory; the GPU gets NF4
    elif s.strategy != "ddp" and s.device == "cpu":
        held, opt = loaded + weights, optimizer_state  # the gathered final model beside this process's part
    return Moment("setup", {"weights": held, "gradients": 0.0, "optimizer_state": opt, "activations": 0.0,
                            "temporaries": 0.0, "runtime": float(s.runtime_bytes)})


def _notes(arch: Architecture, s: Settings) -> list[str]:
    notes = []
    if s.tensor_parallel > 1 and (arch.heads % s.tensor_parallel or arch.kv_heads % s.tensor_parallel):
        notes.append(f"{arch.heads} heads / {arch.kv_heads} key-value heads do not split evenly over {s.tensor_parallel} devices")
    if s.device == "cpu":
        notes.append("with glibc's default malloc, freed activations stay in the heap: processes measured 13-39% above the "
                     "estimate (docs/plan.md); MALLOC_MMAP_THRESHOLD_=131072 makes them follow it")
    if s.method == "qlora" and s.device == "cpu":
        notes.append("QLoRA on a CPU: the engine reloads the model as NF4 from an fp32 file that stays mapped (counted in weights)")
    return notes
