"""Text generation: one prompt in, text out (optionally streamed), the chat template applied.

Used by ``tunelab generate`` / ``tunelab chat`` and by evaluation. Precision and threads come from
``tunelab.hardware`` so generation runs in whatever the machine does fastest.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import PreTrainedTokenizerBase, TextIteratorStreamer

from tunelab.data.images import load_image
from tunelab.errors import UserError
from tunelab.methods.hierarchy_router import routed
from tunelab.models.vision import image_inputs


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; ``temperature == 0`` means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def generate_kwargs(self, tokenizer: PreTrainedTokenizerBase) -> dict[str, object]:
        kwargs: dict[str, object] = {
            "max_new_tokens": self.max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        }
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    *,
    use_chat_template: bool = True,
) -> torch.Tensor:
    """Token ids for a conversation; plain concatenation when the model has no chat template."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        return encoded["input_ids"]
    text = "\n".join(m["content"] for m in messages)
    return tokenizer(text, return_tensors="pt")["input_ids"]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    settings: GenerationSettings = GenerationSettings(),
    *,
    use_chat_template: bool = True,
    on_text: Callable[[str], None] | None = None,
    images: Sequence[str] = (),
) -> str:
    """Generate a reply to ``messages``; ``on_text`` receives text pieces as they are decoded.
    ``images`` (paths or data URLs) go before the last user turn's text, for a vision-language model."""
    extra: dict[str, torch.Tensor] = {}
    if images:
        vision = image_inputs(model, tokenizer)
        if vision is None:
            raise UserError("--image needs a vision-language model; this one reads text only", hint="use a LLaVA-style model or a run trained with method.vision")
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages = [*messages[:last], {**messages[last], "content": "".join(f"{vision.placeholder}\n" for _ in images) + messages[last]["content"]}, *messages[last + 1 :]]
        extra["pixel_values"] = vision.pixel_values([load_image(ref, ref) for ref in images]).to(model.device)
    input_ids = encode_prompt(tokenizer, messages, use_chat_template=use_chat_template).to(model.device)
    if images:
        input_ids = torch.tensor([vision.expand_ids(input_ids[0].tolist())], device=model.device)
    torch.manual_seed(settings.seed)
    kwargs = {**settings.generate_kwargs(tokenizer), **extra}
    model.eval()
    with routed(model, input_ids[0].tolist()):  # hierarchical adapters: the stack the router picks
        return _decode(model, tokenizer, input_ids, kwargs, on_text)


def _decode(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor, kwargs: dict[str, Any], on_text: Callable[[str], None] | None) -> str:
    if on_text is None:
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(
        target=model.generate,
        kwargs={"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "streamer": streamer, **kwargs},
        daemon=True,
    )
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        on_text(piece)
    worker.join()
    return "".join(pieces)
