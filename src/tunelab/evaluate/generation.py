"""Batched generation for evaluation: many prompts at once, cut at stop strings.

``tunelab.generate`` serves one conversation at a time (chat, streaming); evaluation needs
throughput, so prompts are left-padded into batches of similar length and decoded together with
the same ``GenerationSettings``. Stop strings end generation early (transformers' ``stop_strings``)
and are cut from the text, so the scored answer never includes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from tunelab.generate import GenerationSettings


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    tokenizer,  # type: ignore[no-untyped-def]
    prompts: Sequence[str],
    settings: GenerationSettings,
    *,
    stop: Sequence[str] = (),
    add_special_tokens: bool,
    batch_size: int,
    progress: str | None = None,
) -> list[str]:
    """The continuation generated for each prompt (special tokens dropped, cut at ``stop``)."""
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    kwargs = settings.generate_kwargs(tokenizer)
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    pad = kwargs["pad_token_id"]
    outputs = [""] * len(prompts)
    torch.manual_seed(settings.seed)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None, leave=False):
            index = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in index)
            # Left padding: every prompt ends at the same position, where generation starts.
            ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in index])
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in index])
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            for row, i in enumerate(index):
                outputs[i] = cut_at_stop(tokenizer.decode(out[row, width:], skip_special_tokens=True), stop)
    finally:
        model.train(was_training)
    return outputs
