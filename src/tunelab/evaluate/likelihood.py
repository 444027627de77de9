"""Log-likelihood of continuations given contexts, batched: how multiple-choice items are scored.

This follows lm-evaluation-harness: each option is scored by the summed log-probability of its
tokens after the prompt, and the context and continuation are tokenized together (so a leading
space merges the way it would in running text). Unlike the harness, a prompt is run once however
many options it has: the prompt's forward pass keeps its key/value cache, its last position
scores every option's first token, and only the options' remaining tokens run again, each row
reading the prompt from the cache. An item with k options of n tokens then costs one prompt pass
plus k·(n-1) tokens instead of k prompt passes. Prompt and prefix tuning put virtual tokens in
front of (or inside the cache of) every call, so for them each option runs with its whole prompt.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from tunelab.errors import UserError
from tunelab.methods.peft_adapters import is_prompt_learning, unwrap_peft


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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    score_batch = _score_whole_sequences if is_prompt_learning(model) else _score_from_prompt_cache
    # One group per distinct prompt: every option of an item (and of items sharing a prompt) in it.
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (head, _) in enumerate(split):
        groups.setdefault(tuple(head), []).append(i)
    heads = sorted(groups, key=len, reverse=True)  # similar lengths batch together
    totals = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(heads), batch_size), desc=progress, disable=progress is None, leave=False):
            batch = [(list(head), [split[i][1] for i in groups[head]]) for head in heads[start : start + batch_size]]
            for head, values in zip(heads[start : start + batch_size], score_batch(model, batch, pad, batch_size)):
                for i, value in zip(groups[head], values):
                    totals[i] = value
    finally:
        model.train(was_training)
    return [Scored(total, len(tail), len(cont)) for total, (_, tail), (_, cont) in zip(totals, split, requests)]


#: A batch of prompts, each with the token ids of its options.
PromptBatch = list[tuple[list[int], list[list[int]]]]


def _score_from_prompt_cache(model: torch.nn.Module, batch: PromptBatch, pad: int, batch_size: int) -> list[list[float]]:
    """Summed log-probabilities of every option of every prompt; each prompt runs once.

    The prompts run left-padded (so they end together and one position per row needs the
    vocabulary projection); the options' later tokens run right-padded after the prompt's cache,
    ``batch_size`` option rows at a time, with positions continuing from each prompt's length.
    """
    ids, mask = _left_padded([head for head, _ in batch], pad)
    out = model(**_inputs(model, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    prompt_cache, cache_arg = kv_cache_of(model, out)
    totals = [[first[row, tail[0]].item() for tail in tails] for row, (_, tails) in enumerate(batch)]
    longer = [(row, k) for row, (_, tails) in enumerate(batch) for k, tail in enumerate(tails) if len(tail) > 1]
    lengths = mask.sum(-1)
    for start in range(0, len(longer), batch_size):
        chunk = longer[start : start + batch_size]
        rows = torch.tensor([row for row, _ in chunk])
        tails = [batch[row][1][k] for row, k in chunk]
        width = max(len(t) for t in tails) - 1
        tail_ids = torch.tensor([t[:-1] + [pad] * (width + 1 - len(t)) for t in tails])
        tail_mask = torch.tensor([[1] * (len(t) - 1) + [0] * (width + 1 - len(t)) for t in tails])
        cache = copy.deepcopy(prompt_cache) if start + batch_size < len(longer) else prompt_cache
        cache.reorder_cache(rows)  # one cache row per option (a prompt's row repeated)
        positions = lengths[rows, None] + torch.arange(width)
        logits = model(
            **_inputs(model, tail_ids, torch.cat([mask[rows], tail_mask], dim=1), positions), **{cache_arg: cache}, use_cache=True
        ).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for j, ((row, k), tail) in enumerate(zip(chunk, tails)):
            totals[row][k] += logprobs[j, torch.arange(len(tail) - 1), torch.tensor(tail[1:])].sum().item()
    return totals


def _score_whole_sequences(model: torch.nn.Module, batch: PromptBatch, pad: int, batch_size: int) -> list[list[float]]:
    """Summed log-probabilities of every option, each option run with its whole prompt.

    For prompt/prefix tuning, whose virtual tokens a reused cache would not carry. peft ignores
    position ids there, so rows are right-padded (left padding would move the real tokens away
    from the virtual ones); the vocabulary projection still covers only the positions from the
    earliest one any row needs. Options whose inputs are identical up to their last token
    (one-token options of one prompt) share a row.
    """
    keep: dict[tuple[int, ...], int] = {}  # sequence -> how many final positions' logits it needs
    for head, tails in batch:
        for tail in tails:
            seq = tuple(head + tail[:-1])
            keep[seq] = max(keep.get(seq, 0), len(tail))
    sequences = list(keep)
    rows = {seq: i for i, seq in enumerate(sequences)}
    logprobs: list[torch.Tensor] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([list(seq) + [pad] * (width - len(seq)) for seq in chunk])
        mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in chunk])
        first_needed = min(len(seq) - keep[seq] for seq in chunk)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=width - first_needed).logits
        for row, seq in enumerate(chunk):
            end = len(seq) - first_needed
            logprobs.append(torch.log_softmax(logits[row, end - keep[seq] : end].float(), dim=-1))
    totals = []
    for head, tails in batch:
        # An option's tokens are predicted at the last len(tail) of its sequence's kept positions.
        table = [logprobs[rows[tuple(head + tail[:-1])]][-len(tail) :] for tail in tails]
        totals.append([t[torch.arange(len(tail)), torch.tensor(tail)].sum().item() for t, tail in zip(table, tails)])
    return totals


def _left_padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask with every row ending at the last column."""
    width = max(map(len, sequences))
    ids = torch.tensor([[pad] * (width - len(seq)) + seq for seq in sequences])
    mask = torch.tensor([[0] * (width - len(seq)) + [1] * len(seq) for seq in sequences])
    return ids, mask


def _inputs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward arguments; explicit position ids keep padded rows identical to unpadded ones.

    Models without a ``position_ids`` argument (ALiBi models such as BLOOM) read positions from
    the attention mask instead.
    """
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in inspect.signature(unwrap_peft(model).forward).parameters:
        kwargs["position_ids"] = positions
    return kwargs


def kv_cache_of(model: torch.nn.Module, out: Any) -> tuple[Any, str]:
    """The key/value cache a forward returned, and the argument name that passes it back.

    transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns, then goes away).
    """
    if "cache" in inspect.signature(unwrap_peft(model).forward).parameters:
        return out.cache, "cache"
    return out.past_key_values, "past_key_values"
