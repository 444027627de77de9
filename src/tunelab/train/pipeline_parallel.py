"""Pipeline parallelism on ``torch.distributed.pipelining``: ``train.distributed.strategy: pp``.

Each process keeps a contiguous range of the transformer blocks (a stage): the first stage also
the embedding, the last the final norm and the LM head, where the loss is taken. A step's
micro-batches (``train.grad_accum`` of ``train.batch_size`` examples) flow through the stages on a
GPipe or 1F1B schedule, so every stage works on a different micro-batch at once; only the
activations at stage boundaries travel between processes, which suits slow links and models
deeper than one device holds.

How the engine's guarantees carry over:

- **Exact loss.** The last stage sums token losses and divides by the supervised tokens of the
  whole step (``scale_grads=False``), as the one-process loop does, so a step is the same
  optimizer step whatever the number of stages.
- **The model's own code runs each stage.** A stage calls the model's decoder (its masks, rotary
  or ALiBi position code) with only its own blocks in it, and ``inputs_embeds`` past the first
  stage; the real model keeps every name, with placeholders where another stage holds the
  weights, so checkpoints and the final artifact use the one-process names.
- **Fixed shapes.** The schedule learns the shapes it sends on its first step, so every batch is
  padded to the longest example of the run (rows the micro-batch lacks are masked out).
- **A tied embedding and LM head** (SmolLM2, BLOOM) live on the first and the last stage: their
  gradients are summed over those two processes before the optimizer steps, so the copies stay
  equal (Megatron's embedding group).
- Checkpoints are always sharded (each stage writes its own weights and optimizer state with
  ``torch.distributed.checkpoint``), so a run resumes on another number of stages or in one
  plain process; the final artifact is gathered whole on the first stage's CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tunelab.errors import UserError
from tunelab.methods.blocks import block_list
from tunelab.methods.peft_adapters import is_prompt_learning, unwrap_peft
from tunelab.train.config import PipelineConfig
from tunelab.train.objectives import Objective, accumulate
from tunelab.train.objectives.base import Stats

IGNORE_INDEX = -100


@dataclass(frozen=True)
class _Ends:
    """Where an architecture's decoder keeps the modules only the first or the last stage runs."""

    first: tuple[str, ...]  # embedding (and what the decoder applies right after it)
    last: tuple[str, ...]  # final norm


#: Decoders whose forward takes ``inputs_embeds`` and runs only what it holds, so a stage is the
#: decoder with some blocks (checked by the tests against one process, like every entry here).
_ENDS: dict[str, _Ends] = {
    "llama": _Ends(first=("embed_tokens",), last=("norm",)),
    "qwen2": _Ends(first=("embed_tokens",), last=("norm",)),
    "bloom": _Ends(first=("word_embeddings", "word_embeddings_layernorm"), last=("ln_f",)),
}


class OnAnotherStage(torch.nn.Module):
    """Stands where another stage holds the weights, so this process's names stay the model's."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this module's weights are on another pipeline stage")


class _StageModule(torch.nn.Module):
    """What ``PipelineStage`` runs: the decoder with this stage's blocks, from token ids (first
    stage) or the previous stage's hidden states to this stage's hidden states (normed at the last)."""

    def __init__(self, decoder: torch.nn.Module, first: bool):
        super().__init__()
        self.decoder = decoder
        self.first = first

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": x} if self.first else {"inputs_embeds": x}
        return self.decoder(**inputs, attention_mask=attention_mask, use_cache=False).last_hidden_state


def stage_sizes(blocks: int, stages: int, asked: Sequence[int] | None) -> list[int]:
    """Blocks per stage: ``asked`` checked, or as even as possible with earlier stages taking the
    remainder (the last one also runs the LM head and the loss)."""
    if asked is not None:
        if len(asked) != stages or sum(asked) != blocks:
            raise UserError(f"pp.layers {list(asked)} must give {stages} stages (one per process) that add up to the model's {blocks} blocks",
                            where="train.distributed.pp.layers", hint="or leave it out for an even split")
        return list(asked)
    if blocks < stages:
        raise UserError(f"the model's {blocks} blocks cannot fill {stages} pipeline stages", where="train.distributed.strategy",
                        hint=f"run on at most {blocks} processes")
    base, extra = divmod(blocks, stages)
    return [base + (1 if stage < extra else 0) for stage in range(stages)]


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    inner = unwrap_peft(model)
    return getattr(inner, inner.base_model_prefix)


def check_supported(model: torch.nn.Module, objective: Objective) -> None:
    """Refuse, by name, what a pipeline cannot run: other architectures, prompt learning (its
    virtual tokens enter outside the decoder), objectives that need more than the LM head's loss."""
    model_type = unwrap_peft(model).config.model_type
    if model_type not in _ENDS:
        raise UserError(f"no pipeline split for {model_type} models yet (Llama, Qwen2 and BLOOM have one)",
                        where="train.distributed.strategy", hint="use strategy: fsdp for this model")
    if is_prompt_learning(model):
        raise UserError("prompt and prefix tuning add virtual tokens outside the decoder, which a pipeline stage does not run",
                        where="train.distributed.strategy", hint="use strategy: ddp, or LoRA/full fine-tuning under pp")
    if getattr(objective, "loss_from_hidden", None) is None:
        raise UserError(f"objective {objective.name} needs the whole model's outputs; under pp only the last stage sees them",
                        where="train.distributed.strategy", hint="use strategy: ddp or fsdp for this objective")


class Pipeline:
    """This process's stage of ``model`` and the schedule that runs it (collective construction).

    ``model`` is cut in place: the blocks, embedding, final norm and LM head of other stages are
    replaced by ``OnAnotherStage``, freeing their weights; what stays is trained as usual.
    """

    def __init__(
        self, model: torch.nn.Module, objective: Objective, mesh: Any, settings: PipelineConfig, *, micro_batches: int, rows: int,
        length: int, device: torch.device, scale_loss: Callable[[torch.Tensor], torch.Tensor],
    ):
        """``micro_batches`` of ``rows`` examples per step (``train.grad_accum`` and
        ``train.batch_size``), every batch padded to ``length`` tokens; ``scale_loss``: the fp16
        gradient scaler's ``scale`` (identity otherwise)."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        check_supported(model, objective)
        self.group = mesh.get_group()
        self.index, self.stages = mesh.get_local_rank(), mesh.size()
        self.first, self.last = self.index == 0, self.index == self.stages - 1
        self.objective, self.model, self.device = objective, model, device
        self.micro_batches, self.rows, self.length, self.scale_loss = micro_batches, rows, length, scale_loss
        if settings.schedule == "1f1b" and micro_batches < self.stages:
            raise UserError(f"the 1F1B schedule needs at least as many micro-batches per step as stages ({self.stages}); train.grad_accum is {micro_batches}",
                            where="train.grad_accum", hint=f"set train.grad_accum to {self.stages} or more (fewer leave stages idle), or pp.schedule: gpipe")
        stage_decoder, tied = self._cut(model, settings)
        #: This stage's copy of a trainable embedding tied to the LM head (first and last stage only).
        self.tied = tied if (self.first or self.last) else None
        ends = [dist.get_global_rank(self.group, r) for r in (0, self.stages - 1)]
        self._tie_group = dist.new_group(ends) if tied is not None else None  # every process creates it, in step
        self._stage_decoder = stage_decoder
        stage = PipelineStage(_StageModule(stage_decoder, self.first), self.index, self.stages, device, group=self.group)
        Schedule = Schedule1F1B if settings.schedule == "1f1b" else ScheduleGPipe
        self.schedule = Schedule(stage, micro_batches, loss_fn=self._loss, scale_grads=False)
        self._units = 1
        self._records: list[Stats] = []

    # -- the split -------------------------------------------------------------------------------

    def _cut(self, model: torch.nn.Module, settings: PipelineConfig) -> tuple[torch.nn.Module, torch.nn.Parameter | None]:
        """Keep only this stage's modules in ``model``; returns the decoder this stage runs and the
        trainable weight the embedding and LM head share (None when untied or frozen)."""
        inner, decoder = unwrap_peft(model), _decoder(model)
        ends = _ENDS[inner.config.model_type]
        blocks_name, blocks = block_list(decoder)
        sizes = stage_sizes(len(blocks), self.stages, settings.layers)
        start = sum(sizes[: self.index])
        mine = range(start, start + sizes[self.index])
        head, embedding = inner.get_output_embeddings(), decoder.get_submodule(ends.first[0])
        tied = head.weight if head is not None and head.weight is embedding.weight and head.weight.requires_grad else None

        view = copy.copy(decoder)  # the decoder's code and settings, with its own module table
        view._modules = dict(decoder._modules)
        setattr(view, blocks_name.rpartition(".")[2], torch.nn.ModuleList([blocks[i] for i in mine]))
        if getattr(decoder.config, "layer_types", None) is not None:  # Qwen2 looks a block's attention up by its position
            view.config = copy.copy(decoder.config)
            view.config.layer_types = [decoder.config.layer_types[i] for i in mine]
        for i in range(len(blocks)):
            if i not in mine:
                blocks[i] = OnAnotherStage()
        for names, kept in ((ends.first, self.first), (ends.last, self.last)):
            for name in names if not kept else ():
                setattr(view, name, torch.nn.Identity())  # the decoder's forward still calls them
                setattr(decoder, name, OnAnotherStage())
        if not self.last:
            inner.set_output_embeddings(OnAnotherStage())
        return view, tied

    # -- a step ------------------------------------------------------------------------------------

    def _loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One micro-batch's summed token loss over the step's supervised tokens (last stage).
        Also called once on the first step while the schedule learns its shapes: the records
        kept are the last ``micro_batches``."""
        batch = _untarget(target)
        loss_sum, stats = self.objective.loss_from_hidden(self.model, hidden, batch)  # type: ignore[attr-defined]
        self._records.append(stats)
        return self.scale_loss(loss_sum / self._units)

    def _inputs(self, micro: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The step's micro-batches padded to ``length`` and to equal rows, stacked."""
        padded = [_pad(b, self.rows, self.length) for b in micro]
        return {key: torch.cat([b[key] for b in padded]) for key in padded[0]}

    def _run(self, inputs: dict[str, torch.Tensor], train: bool) -> list[Stats]:
        self._records = []
        self._stage_decoder.train(self.model.training)  # the decoder copy's own flag, as the model's (its children are the model's)
        args = (inputs["input_ids"],) if self.first else ()
        target = _target(inputs)
        run = self.schedule.step if train else self.schedule.eval
        run(*args, attention_mask=inputs["attention_mask"], target=target if self.last else None)
        records = self._records[-self.micro_batches :] if self.last else None
        shared = [records]
        dist.broadcast_object_list(shared, group_src=self.stages - 1, group=self.group)
        return shared[0]

    def train_step(self, micro: Sequence[dict[str, torch.Tensor]], units: int) -> tuple[float, Stats]:
        """Forward and backward of the step's micro-batches through the pipeline, ``units`` the
        supervised tokens of the whole step; returns the summed loss and statistics (every stage)."""
        if len(micro) != self.micro_batches:
            raise ValueError(f"the pipeline runs {self.micro_batches} micro-batches per step, got {len(micro)}")
        self._units = units
        per_batch = self._run(self._inputs(micro), train=True)
        self._sum_tied_gradients()
        stats: Stats = {}
        for record in per_batch:
            accumulate(stats, record)
        return float(stats.get("loss_sum", 0.0)), stats

    @torch.no_grad()
    def evaluate(self, batches: Sequence[dict[str, torch.Tensor]]) -> list[Stats]:
        """Statistics of each batch (collective), ``micro_batches`` batches per schedule run; a
        last run that has fewer gets empty ones (all rows masked, no supervised token)."""
        out: list[Stats] = []
        for start in range(0, len(batches), self.micro_batches):
            group = list(batches[start : start + self.micro_batches])
            real = len(group)
            group += [_nothing(group[0])] * (self.micro_batches - real)
            self._units = 1
            out.extend(self._run(self._inputs(group), train=False)[:real])
        return out

    def _sum_tied_gradients(self) -> None:
        """The embedding's and the tied LM head's gradients summed over the first and last stages,
        so both copies take the same step (what one process computes for the shared weight)."""
        if self._tie_group is None or self.tied is None or self.tied.grad is None:
            return
        dist.all_reduce(self.tied.grad, group=self._tie_group)

    def clip_grad_norm_(self, parameters: list[torch.nn.Parameter], max_norm: float) -> None:
        """Clip by the norm of every stage's gradients together (the tied weight counted once)."""
        counted = [p for p in parameters if p.grad is not None and not (self.last and not self.first and p is self.tied)]
        squares = torch.zeros((), dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        for p in counted:
            squares += torch.linalg.vector_norm(p.grad.detach(), 2.0, dtype=torch.float64).square()
        dist.all_reduce(squares, group=self.group)
        scale = min(1.0, max_norm / (float(squares.sqrt()) + 1e-6))
        if scale < 1.0:
            for p in parameters:
                if p.grad is not None:
                    p.grad.detach().mul_(scale)

    # -- the whole model again -----------------------------------------------------------------

    def gathered_weights(self) -> dict[str, torch.Tensor]:
        """Every stage's weights by name on the first stage's CPU, ``{}`` on the others
        (collective). Each weight travels on its own (point to point, into a buffer of its known
        shape), so the first stage never holds more than the model once."""
        mine = dict(self.model.named_parameters(remove_duplicate=False))
        layouts: list[Any] = [None] * self.stages
        dist.all_gather_object(layouts, {name: (tuple(p.shape), p.dtype) for name, p in mine.items()}, group=self.group)
        out = {name: p.detach().cpu() for name, p in mine.items()} if self.first else {}
        first = dist.get_global_rank(self.group, 0)
        for stage in range(1, self.stages):
            owner = dist.get_global_rank(self.group, stage)
            for name, (shape, dtype) in layouts[stage].items():
                if self.index == stage:
                    dist.send(mine[name].detach().contiguous(), dst=first, group=self.group)
                elif self.first:
                    received = torch.empty(shape, dtype=dtype, device=self.device)
                    dist.recv(received, src=owner, group=self.group)
                    out[name] = received.cpu()
        return out


def _target(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels and per-token weights as one tensor (the schedule splits one target per micro-batch)."""
    return torch.stack([batch["labels"].double(), batch["weights"].double()], dim=-1)


def _untarget(target: torch.Tensor) -> dict[str, torch.Tensor]:
    labels, weights = target[..., 0].long(), target[..., 1]
    return {"labels": labels, **({"weights": weights.float()} if bool((weights != 1).any()) else {})}


def _pad(batch: dict[str, torch.Tensor], rows: int, length: int) -> dict[str, torch.Tensor]:
    """``batch`` right-padded to ``rows x length``, with per-token ``weights``: padding positions
    unsupervised and masked; a padding row attends to its first position only (a fully masked
    row would give NaN)."""
    have_rows, have_len = batch["input_ids"].shape
    if have_len > length:
        raise ValueError(f"a batch of {have_len} tokens is longer than the pipeline's fixed length {length}")
    fills = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX, "weights": 1.0}
    out = {}
    for key, fill in fills.items():
        value = batch.get(key, torch.ones_like(batch["labels"], dtype=torch.float32))  # weights: 1 unless given
        grown = torch.full((rows, length), fill, dtype=value.dtype, device=value.device)
        grown[:have_rows, :have_len] = value
        out[key] = grown
    out["attention_mask"][have_rows:, 0] = 1
    return out


def _nothing(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch like ``batch`` with no rows (padded to masked rows: fills an evaluation run's
    missing micro-batches)."""
    return {k: v[:0] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}


def fixed_length(lengths: Sequence[int], multiple: int = 8) -> int:
    """The length every pipeline batch is padded to: the longest example, rounded up to ``multiple``."""
    longest = max(lengths)
    return -(-longest // multiple) * multiple
