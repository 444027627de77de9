"""Causal language modelling on supervised tokens only.

Logits are computed only at positions whose next token carries loss (``logits_to_keep`` with a
boolean mask), so prompt tokens never pay for the ``hidden × vocab`` projection: on chat SFT data,
where prompts are longer than answers, that is most of the LM-head compute and memory (SmolLM2's
vocabulary is 49,152). Prompt-learning adapters (prompt/prefix tuning) prepend virtual tokens the
mask cannot describe; for them the full logits are computed and the virtual positions dropped.

When the LM head is a plain linear layer, the loss is computed by ``fused_linear_cross_entropy``:
the head and the cross-entropy in row chunks, so the ``[tokens, vocab]`` logits never exist whole
(what dominates memory when every token is supervised). Objectives that need the logits
themselves (distillation, preferences) use ``forward_supervised``, which still returns them.

Packed rows run attention once per example (``tunelab.train.varlen_attention``) on models whose
attention goes through transformers' attention interface, instead of one block-diagonal-masked
attention over the whole row; the trainer's rows also hold a batch's common unsupervised prefix
(the system prompt and instruction of chat data) once instead of once per example. Models that cannot take packed rows exactly (``packs_exactly``:
BLOOM drops ``position_ids``, BERT attends both ways) get padded batches instead.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers.modeling_utils

from tunelab.methods.peft_adapters import is_prompt_learning, unwrap_peft
from tunelab.train.distributed import unwrap as unwrap_ddp
from tunelab.train.last_block import last_gated_mlp, mlp_at, pays_to_slice, read_positions
from tunelab.train.objectives.base import ObjectiveContext, Stats, register_objective
from tunelab.train.objectives.fused_cross_entropy import fused_linear_cross_entropy
from tunelab.train.packing_check import packs_exactly
from tunelab.train.sharding import is_shard
from tunelab.train.varlen_attention import (
    segment_bounds,
    supports_varlen,
    varlen_attention,
)

IGNORE_INDEX = -100


@dataclass
class SupervisedForward:
    """One model's outputs at a batch's supervised positions (rows: the N picked positions)."""

    logits: torch.Tensor  # [N, vocab]
    targets: torch.Tensor  # [N]
    picked: torch.Tensor  # [B, T-1] bool: position t is picked when token t+1 carries loss
    hidden_states: list[torch.Tensor] | None = None  # [N, width] per layer; index 0 is the embeddings


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(unwrap_peft(model).forward).parameters


#: Whether this transformers slices the hidden states by a ``[batch, seq]`` boolean mask before the
#: head (``slice_logits_to_keep``, 5.2x). Earlier 5.x releases index every row by one list of
#: positions; there the union of the rows' positions is kept and the mask applied to the logits.
MASK_SLICING = hasattr(transformers.modeling_utils, "slice_logits_to_keep")


def _sliced_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor], keep: torch.Tensor, **kwargs: object) -> tuple[object, torch.Tensor]:
    """``model``'s output and its logits at the ``True`` positions of ``keep`` (``[N, vocab]``, row-major)."""
    if MASK_SLICING:
        out = model(**inputs, logits_to_keep=keep, **kwargs)
        return out, out.logits.reshape(-1, out.logits.shape[-1])
    positions = keep.any(0).nonzero().flatten()
    out = model(**inputs, logits_to_keep=positions, **kwargs)
    return out, out.logits[keep[:, positions]]


#: Config fields with which a causal LM transforms its logits after the head (Gemma's soft-capping,
#: Cohere's and Granite's scales): the fused loss would skip them, so such models keep the plain path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformer under the LM head (``model.model`` for Llama), through DDP and peft wrappers."""
    inner = unwrap_peft(unwrap_ddp(model))
    decoder = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    return decoder if isinstance(decoder, torch.nn.Module) else None


def fusable_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The LM head when ``logits = head(decoder(...).last_hidden_state)`` holds exactly: a plain
    bias-free ``nn.Linear`` (not a LoRA-wrapped one), behind the decoder the model names as its
    base, with no logit transform configured."""
    inner = unwrap_peft(unwrap_ddp(model))
    head = getattr(inner, "lm_head", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or _decoder(model) is None:
        return None
    return None if _transforms_logits(model) else head


def _transforms_logits(model: torch.nn.Module) -> bool:
    config = getattr(unwrap_peft(unwrap_ddp(model)), "config", None)
    return any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


class CausalLMObjective:
    """Token-level cross-entropy on positions whose label is not -100."""

    name = "causal_lm"

    def __init__(self, model: torch.nn.Module, *, sliced_logits: bool = True, varlen: bool = True, fused_loss: bool = True,
                 shared_prefix: bool = False, sliced_last_mlp: bool = True):
        """``sliced_logits``/``varlen``/``fused_loss``/``shared_prefix``/``sliced_last_mlp`` exist so
        the benchmark can measure each lever switched off. ``shared_prefix`` asks for packed rows
        that hold the batch's common unsupervised prefix once (``collate_packed(share_prefix=True)``);
        it needs per-example attention, so ``self.shared_prefix`` says whether the model got it."""
        self.prompt_learning = is_prompt_learning(model)
        self.sliced_logits = sliced_logits and not self.prompt_learning and _accepts_logits_to_keep(model)
        # The last block's MLP only where the loss reads it (``tunelab.train.last_block``): the
        # positions are the sliced head's, so only where those are the model's own.
        self.sliced_last_mlp = sliced_last_mlp and self.sliced_logits
        # Looked up once: a DDP wrapper added later holds the same modules.
        self.head = fusable_head(model) if fused_loss and self.sliced_logits else None
        self.fused_loss = self.head is not None
        varlen = varlen and not self.prompt_learning and supports_varlen(model)
        packs = not self.prompt_learning and packs_exactly(model, varlen=varlen)
        if not packs and not self.prompt_learning:
            print(f"tunelab: {type(unwrap_peft(model)).__name__} computes packed rows differently from each example alone; training on padded batches", flush=True)
        self.varlen = varlen and packs
        self.collation = "packed" if packs else "padded"
        self.shared_prefix = shared_prefix and self.varlen
        #: Per-example attention reads a padding segment as no example (``pad_packed_row``).
        self.row_padding = self.varlen
        #: Its loss reads only positions that predict a supervised token (each through its own
        #: label slot), so packed rows may leave out inputs no target reads (``collate_packed``).
        self.drops_unread_inputs = True

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def _packed_attention(self, batch: dict[str, torch.Tensor]) -> bool:
        return self.varlen and "position_ids" in batch and "attention_mask" not in batch

    @contextlib.contextmanager
    def attention_scope(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Iterator[None]:
        """Per-example attention for a packed ``batch`` and the last block's MLP at the positions
        the loss reads, for as long as the context lasts.

        The trainer holds it over the backward pass as well: activation checkpointing re-runs
        the forward there, and it must compute exactly as the first forward did.
        """
        with contextlib.ExitStack() as scope:
            if self._packed_attention(batch):
                scope.enter_context(varlen_attention(model))
            last_mlp = last_gated_mlp(model) if self.sliced_last_mlp else None
            keep = read_positions(batch["labels"]) if last_mlp is not None else None
            if last_mlp is not None and pays_to_slice(keep):
                scope.enter_context(mlp_at(last_mlp, keep))
            yield

    def supervised_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [N, vocab], targets [N], picked [B, T-1])`` at the N positions whose next token is
        supervised, computed the cheapest way the model allows (sliced LM head, per-example attention
        on packed rows)."""
        out = self.forward_supervised(model, batch)
        return out.logits, out.targets, out.picked

    def _model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids", "pixel_values")}
        shared = "segment_bounds" in batch
        if shared and not self._packed_attention(batch):
            raise ValueError("a batch with a shared prefix needs per-example attention, which this model does not run")
        if shared:
            inputs["cu_seq_lens_q"] = batch["segment_bounds"]
            inputs["segment_prefix"] = batch["segment_prefix"]
        elif self._packed_attention(batch):
            inputs["cu_seq_lens_q"] = segment_bounds(batch["position_ids"])
        return inputs

    def forward_supervised(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, hidden_states: bool = False) -> SupervisedForward:
        """``supervised_logits`` plus, when asked, every layer's hidden states at the same positions.
        Objectives that compare models (distillation, preferences) call this for each model: the
        positions are picked from the labels alone, so the rows line up."""
        labels = batch["labels"]
        inputs = self._model_inputs(batch)
        supervised_next = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t+1
        targets = labels[:, 1:][supervised_next]
        with self.attention_scope(model, batch):
            if self.sliced_logits:
                out, logits = _sliced_forward(model, inputs, read_positions(labels), use_cache=False, output_hidden_states=hidden_states)
            else:
                out = model(**inputs, use_cache=False, output_hidden_states=hidden_states)
                full = out.logits[:, -labels.shape[1] :]  # drop virtual-token positions of prompt learning
                logits = full[:, :-1][supervised_next]
        states = None
        if hidden_states:
            states = [h[:, -labels.shape[1] :][:, :-1][supervised_next] for h in out.hidden_states]
        return SupervisedForward(logits, targets, supervised_next, states)

    def supervised_hidden(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(last hidden state [N, width], targets [N], picked [B, T-1])`` at the supervised
        positions, the LM head left to the fused loss.

        The call still goes through ``model`` itself (a DistributedDataParallel wrapper must see
        the forward to reduce the gradients), asking for the logits of no position; a hook on the
        decoder picks up its output on the way.
        """
        decoder = _decoder(model)
        labels = batch["labels"]
        supervised_next = labels[:, 1:] != IGNORE_INDEX
        captured: list[torch.Tensor] = []
        handle = decoder.register_forward_hook(lambda _module, _args, out: captured.append(out.last_hidden_state))
        try:
            with self.attention_scope(model, batch):
                no_position = torch.zeros(0, dtype=torch.long, device=labels.device)  # a list of positions: every transformers 5.x takes it
                model(**self._model_inputs(batch), logits_to_keep=no_position, use_cache=False)
        finally:
            handle.remove()
        return captured[0][:, :-1][supervised_next], labels[:, 1:][supervised_next], supervised_next

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        # a sharded head (strategy: fsdp) is whole only inside the model's forward: its logits come from there
        if self.fused_loss and not is_shard(self.head.weight):
            hidden, targets, supervised_next = self.supervised_hidden(model, batch)
            return self._hidden_loss(model, hidden, targets, _token_weights(batch, supervised_next))
        logits, targets, supervised_next = self.supervised_logits(model, batch)
        return _logits_loss(logits, targets, _token_weights(batch, supervised_next))

    def loss_from_hidden(self, model: torch.nn.Module, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        """The loss from the decoder's last hidden states ``[B, T, width]``, the LM head applied
        here: what a pipeline's last stage computes (``tunelab.train.pipeline_parallel``)."""
        labels = batch["labels"]
        supervised_next = labels[:, 1:] != IGNORE_INDEX
        return self._hidden_loss(model, hidden[:, :-1][supervised_next], labels[:, 1:][supervised_next], _token_weights(batch, supervised_next))

    def _hidden_loss(self, model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, Stats]:
        """Loss at the supervised positions' hidden states: fused with the head when it is plain."""
        if self.fused_loss:
            loss_sum, correct = fused_linear_cross_entropy(hidden, self.head.weight, targets, weights)
            return loss_sum, _stats(loss_sum, targets, correct)
        if _transforms_logits(model):
            raise ValueError("this model transforms its logits after the LM head; its loss needs the model's own forward")
        return _logits_loss(unwrap_peft(unwrap_ddp(model)).get_output_embeddings()(hidden), targets, weights)

    def summarize(self, stats: Stats) -> dict[str, float]:
        tokens = max(1, stats.get("tokens", 0))
        loss = stats.get("loss_sum", 0.0) / tokens
        return {
            "loss": loss,
            "perplexity": float(torch.exp(torch.tensor(min(loss, 50.0)))),
            "token_accuracy": stats.get("correct", 0) / tokens,
        }


def _token_weights(batch: dict[str, torch.Tensor], supervised_next: torch.Tensor) -> torch.Tensor | None:
    """Each supervised token's weight (``data.weight_column``: its example's), or None."""
    weights = batch.get("weights")
    return None if weights is None else weights[:, 1:][supervised_next]


def _logits_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, Stats]:
    per_token = F.cross_entropy(logits.float(), targets, reduction="none")
    loss_sum = per_token.sum() if weights is None else (per_token * weights).sum()
    return loss_sum, _stats(loss_sum, targets, (logits.argmax(-1) == targets).sum())


def _stats(loss_sum: torch.Tensor, targets: torch.Tensor, correct: torch.Tensor | int) -> Stats:
    return {"loss_sum": loss_sum.detach().item(), "tokens": int(targets.numel()), "correct": int(correct)}


@register_objective("causal_lm", heads=(None,))
def causal_lm(cfg: object, ctx: ObjectiveContext) -> CausalLMObjective:
    return CausalLMObjective(ctx.model, shared_prefix=True)
