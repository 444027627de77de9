"""Batched generation for evaluation: many prompts at once, cut at stop strings.

``tunelab.generate`` serves one conversation at a time (chat, streaming); evaluation needs
throughput, so prompts are left-padded into batches of similar length and decoded together with
the same ``GenerationSettings``. A row stops as soon as its generated text contains a stop string,
and the text is cut there, so the scored answer never includes it. (transformers' own
``stop_strings`` also match a stop string that straddles the end of the prompt, which would end
a "\n\n"-stopped answer at its first newline after a prompt ending in "\n".)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from tunelab.data.images import IMAGE_MARKER, load_image
from tunelab.errors import UserError
from tunelab.generate import GenerationSettings
from tunelab.models.vision import image_inputs


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]


class StopOnText(StoppingCriteria):
    """Done for each row whose text generated after ``prompt_width`` tokens contains a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int):  # type: ignore[no-untyped-def]
        self.tokenizer, self.stop, self.prompt_width = tokenizer, [s for s in stop if s], prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stop) for text in texts], dtype=torch.bool)  # type: ignore[return-value]


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
    images: Sequence[Sequence[str]] | None = None,
) -> list[str]:
    """The continuation generated for each prompt (special tokens dropped, cut at ``stop``).

    ``images``: each prompt's image references, in the order of the image markers in its text
    (a vision-language model reads them; ``tunelab.data.images``).
    """
    vision = image_inputs(model, tokenizer) if images and any(images) else None
    if images and any(images) and vision is None:
        raise UserError("the rows have images, but the model reads text only", hint="evaluate a vision-language model, or rows without images")
    if vision is not None:
        prompts = [p.replace(IMAGE_MARKER, vision.placeholder) for p in prompts]
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    if vision is not None:
        encoded = [vision.expand_ids(ids) for ids in encoded]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    kwargs = settings.generate_kwargs(tokenizer)
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
            criteria = StoppingCriteriaList([StopOnText(tokenizer, stop, width)] if stop else [])
            extra = {}
            if vision is not None and images is not None and any(images[i] for i in index):
                extra["pixel_values"] = vision.pixel_values([load_image(ref, ref) for i in index for ref in images[i]])
            out = model.generate(input_ids=ids, attention_mask=mask, stopping_criteria=criteria, **kwargs, **extra)
            for row, i in enumerate(index):
                outputs[i] = cut_at_stop(tokenizer.decode(out[row, width:], skip_special_tokens=True), stop)
    finally:
        model.train(was_training)
    return outputs
