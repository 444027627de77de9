"""The student's own answers, for on-policy distillation: the prompts of a training batch are cut
out of it, the student (as it is at this step) samples a continuation for each, and the result is
a new batch whose supervised tokens are the sampled ones, ready for the teacher to score.

Everything stays in token ids: no decode/re-encode round trip can change what the student
actually produced. Sampling stops at the token that ends the data's answers (the last supervised
token of each example: ``<|im_end|>`` in chat data) or the tokenizer's end of text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tunelab.data import Example
from tunelab.data.bundle import IGNORE_INDEX
from tunelab.distill.teacher_cache import segments
from tunelab.methods.peft_adapters import unwrap_peft
from tunelab.train.varlen_attention import standard_attention


@dataclass(frozen=True)
class Prompt:
    """One example's prompt tokens, the token that ended its answer, and its weight."""

    ids: list[int]
    stop: int
    weight: float


def batch_prompts(batch: dict[str, torch.Tensor]) -> list[Prompt]:
    """The prompt of every example in ``batch`` (its tokens before the first supervised one)."""
    prompts = []
    weights = batch.get("weights")
    for row, start, end in segments(batch):
        labels = batch["labels"][row, start:end]
        supervised = (labels != IGNORE_INDEX).nonzero().flatten()
        if supervised.numel() == 0 or supervised[0] == 0:
            continue  # nothing to answer, or no prompt to answer from
        first, last = int(supervised[0]), int(supervised[-1])
        weight = float(weights[row, start]) if weights is not None else 1.0
        prompts.append(Prompt(batch["input_ids"][row, start : start + first].tolist(), int(labels[last]), weight))
    return prompts


def sample_answers(
    model: torch.nn.Module, prompts: list[Prompt], *, max_new_tokens: int, temperature: float, pad_id: int, end_of_text: int | None
) -> list[list[int]]:
    """One sampled continuation per prompt (ending with its stop token when it stopped)."""
    generator = unwrap_peft(getattr(model, "module", model))  # DDP and PEFT wrappers: generate on the model itself
    stops = sorted({p.stop for p in prompts} | ({end_of_text} if end_of_text is not None else set()))
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding: every continuation starts at column `width`
        ids[row, width - len(prompt.ids) :] = torch.tensor(prompt.ids)
        mask[row, width - len(prompt.ids) :] = 1
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), standard_attention(model):
            out = generator.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_id,
            )
    finally:
        model.train(was_training)
    answers = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        answers.append(row[:cut])
    return answers


def answered_batch(
    prompts: list[Prompt], answers: list[list[int]], collate: Callable[[list[Example]], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor] | None:
    """A training batch of prompt + sampled answer, loss on the answer's tokens; None when the
    student produced nothing to score."""
    examples = [
        Example(input_ids=p.ids + a, labels=[IGNORE_INDEX] * len(p.ids) + a, weight=p.weight)
        for p, a in zip(prompts, answers) if a
    ]
    return collate(examples) if examples else None
