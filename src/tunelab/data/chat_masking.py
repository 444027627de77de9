"""Tokenize a conversation and mark which tokens carry loss.

Assistant turns are located by rendering the conversation prefix by prefix with the chat
template: the text added between "everything before turn i, plus the generation prompt" and
"everything up to and including turn i" is exactly what the model must produce for that turn,
end-of-turn marker included. This works for any template (the model's own or a fallback) without
the ``{% generation %}`` markers few templates have. Trailing whitespace after the end marker
(ChatML's newline) is left unsupervised: generation stops at the marker, so nothing after it is
ever produced.

Character spans map to tokens through the fast tokenizer's offsets: a token is supervised when it
overlaps a span, the rule ``apply_chat_template(return_assistant_tokens_mask=True)`` uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tunelab.data.bundle import IGNORE_INDEX
from tunelab.data.prompting import Message
from tunelab.data.templates import render_chat
from tunelab.errors import UserError


@dataclass(frozen=True)
class Span:
    """Characters ``[start, end)`` of one assistant turn in the rendered conversation."""

    start: int
    end: int
    learned: bool


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], template: str, full: str, where: str
) -> list[Span]:
    """Where each assistant turn (content and end marker) sits in ``full``, the rendered chat."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], template, add_generation_prompt=True, where=where)
        through = render_chat(tokenizer, messages[: i + 1], template, where=where)
        if not (through.startswith(before) and full.startswith(through)):
            raise UserError(
                "the chat template renders earlier turns differently once later turns follow, so assistant "
                "turns cannot be located",
                where=where,
                hint="set data.template: chatml (or another named template)",
            )
        end = len(before) + len(through[len(before) :].rstrip())
        spans.append(Span(len(before), end, learned=message.get("weight", 1) != 0))
    return spans


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    template: str,
    *,
    train_on_prompt: bool,
    where: str,
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one conversation.

    Learned assistant turns are supervised; with ``train_on_prompt`` every token is, except
    assistant turns of weight 0 (demonstrations and turns the data marks as not to be learned).
    """
    full = render_chat(tokenizer, messages, template, where=where)
    spans = assistant_spans(tokenizer, messages, template, full, where)
    try:
        encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise UserError(
            f"{type(tokenizer).__name__} cannot map tokens to characters (not a fast tokenizer)",
            hint="use a model whose tokenizer has a tokenizer.json",
        ) from None
    labels = []
    for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
        overlapping = [span for span in spans if start < span.end and end > span.start]
        learned = all(s.learned for s in overlapping) if train_on_prompt else any(s.learned for s in overlapping)
        labels.append(token if learned else IGNORE_INDEX)
    return list(encoding["input_ids"]), labels
