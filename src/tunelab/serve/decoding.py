"""Token-by-token decoding with what the OpenAI API asks of it: sampling with a seed, stop
strings, per-token log-probabilities, streaming, and token counts.

``transformers``' ``generate`` does sampling well but hides the per-token loop that streaming
with stop strings and log-probabilities needs (stop strings cut the text mid-token, and a
streamed piece must never contain text a stop string will later remove). This loop is small:
one forward per token over the key/value cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from tunelab.evaluate.likelihood import kv_cache_of


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no log-probabilities


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Piece:
    """New text since the previous piece; the last piece has ``finish_reason`` set."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


def _end_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """Tokens that end a reply: the tokenizer's EOS and the model's generation config's (an id or a
    list; chat models often end turns with a token other than EOS, SmolLM2's ``<|im_end|>``)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(configured if isinstance(configured, (list, tuple)) else [configured])]
    return {int(i) for i in ids if isinstance(i, int)}


@torch.no_grad()
def decode(model: torch.nn.Module, tokenizer, input_ids: torch.Tensor, sampling: Sampling) -> Iterator[Piece]:
    """Pieces of the continuation of ``input_ids`` ``[1, T]``; the last one says why it ended."""
    generator = torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else torch.seed() % 2**63)
    end_ids = _end_ids(model, tokenizer)
    tokens: list[int] = []
    sent = 0  # characters of the decoded text already emitted
    pending: list[TokenLogprob] = []
    step_input, cache, cache_arg = input_ids, None, "cache"
    finish = "length"
    for _ in range(sampling.max_tokens):
        kwargs = {cache_arg: cache} if cache is not None else {}
        out = model(input_ids=step_input, use_cache=True, logits_to_keep=1, **kwargs)
        cache, cache_arg = kv_cache_of(model, out)
        logits = out.logits[0, -1].float()
        token = _pick(logits, sampling, generator)
        if token in end_ids:
            finish = "stop"
            break
        tokens.append(token)
        if sampling.top_logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            top = logp.topk(sampling.top_logprobs) if sampling.top_logprobs else None
            pending.append(TokenLogprob(tokenizer.decode([token]), float(logp[token]),
                                        [] if top is None else [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices)]))
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        hit = min((text.find(s) for s in sampling.stop if s in text), default=-1)
        if hit >= 0:
            yield Piece(text[sent:hit], pending, "stop", len(tokens))
            return
        ready = len(text) - _held_back(text, sampling.stop)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            ready = min(ready, len(text) - 1)
        if ready > sent:
            yield Piece(text[sent:ready], pending, None, len(tokens))
            sent, pending = ready, []
        step_input = torch.tensor([[token]], device=input_ids.device)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    yield Piece(text[sent:], pending, finish, len(tokens))
