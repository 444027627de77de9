"""Log-likelihood of continuations given contexts, batched: how multiple-choice items are scored.

This follows lm-evaluation-harness: each option is scored by the summed log-probability of its
tokens after the prompt, the context and continuation are tokenized together (so a leading space
merges the way it would in running text), and requests whose inputs are identical up to the last
continuation token share one forward pass (two single-token options such as "yes"/"no" cost one
pass over the prompt, not two).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from tunelab.errors import UserError
from tunelab.methods.peft_adapters import unwrap_peft


@dataclass(frozen=True)
class Scored:
    """The log-likelihood of one continuation and how many tokens and characters it spans."""

    logprob: float
    tokens: int
    chars: int


def split_tokens(tokenizer, context: str, continuation: str, add_special_tokens: bool) -> tuple[list[int], list[int]]:  # type: ignore[no-untyped-def]
    """Token ids of ``context`` and of ``continuation`` as they occur in ``context + continuation``."""
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    head = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
    if whole[: len(head)] == head and len(whole) > len(head):
        return head, whole[len(head) :]
    # The boundary token merged across context and continuation: score the continuation on its own.
    return head, tokenizer(continuation, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def continuation_logprobs(
    model: torch.nn.Module,
    tokenizer,  # type: ignore[no-untyped-def]
    requests: Sequence[tuple[str, str]],
    *,
    add_special_tokens: bool,
    batch_size: int,
    progress: str | None = None,
) -> list[Scored]:
    """``log P(continuation | context)`` for each ``(context, continuation)`` pair."""
    split = [split_tokens(tokenizer, ctx, cont, add_special_tokens) for ctx, cont in requests]
    if any(not head for head, _ in split):
        raise UserError("an option cannot be scored after an empty prompt", hint="check eval.prompt_template")
    # One input sequence per distinct context+continuation[:-1]; the last token is only a target.
    sequences: dict[tuple[int, ...], int] = {}
    for head, tail in split:
        sequences.setdefault(tuple(head + tail[:-1]), len(sequences))
    inputs = list(sequences)
    keep = [0] * len(inputs)  # how many final positions' logits each sequence needs
    for head, tail in split:
        i = sequences[tuple(head + tail[:-1])]
        keep[i] = max(keep[i], len(tail))
    logprobs: list[torch.Tensor] = [torch.empty(0)] * len(inputs)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))  # similar lengths batch together
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None, leave=False):
            index = order[start : start + batch_size]
            batch_logprobs = _last_logprobs(model, [inputs[i] for i in index], max(keep[i] for i in index), pad)
            for row, i in enumerate(index):
                logprobs[i] = batch_logprobs[row]
    finally:
        model.train(was_training)
    results = []
    for (head, tail), (_, continuation) in zip(split, requests):
        # The continuation's tokens are predicted at the last len(tail) positions of its sequence.
        table = logprobs[sequences[tuple(head + tail[:-1])]][-len(tail) :]
        total = table[torch.arange(len(tail)), torch.tensor(tail)].sum().item()
        results.append(Scored(total, len(tail), len(continuation)))
    return results


def _last_logprobs(model: torch.nn.Module, batch: list[tuple[int, ...]], keep: int, pad: int) -> torch.Tensor:
    """Log-softmax over the vocabulary at the last ``keep`` positions of each sequence.

    Sequences are left-padded so they all end together: then only the last ``keep`` positions
    need the vocabulary projection (``logits_to_keep``), which at 50k-token vocabularies is most
    of the memory and a fifth of the compute. Explicit position ids keep padded rows identical to
    unpadded ones for models that take them (ALiBi models such as BLOOM read the mask instead).
    """
    width = max(map(len, batch))
    ids = torch.tensor([[pad] * (width - len(seq)) + list(seq) for seq in batch])
    mask = torch.tensor([[0] * (width - len(seq)) + [1] * len(seq) for seq in batch])
    kwargs: dict[str, torch.Tensor | int] = {"input_ids": ids, "attention_mask": mask, "logits_to_keep": keep}
    if "position_ids" in inspect.signature(unwrap_peft(model).forward).parameters:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(**kwargs).logits[:, -keep:]
    return torch.log_softmax(logits.float(), dim=-1)
