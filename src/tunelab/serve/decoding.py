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


class _Row:
    """One request's decoding state: its tokens, the text already sent, its random stream."""

    def __init__(self, tokenizer, sampling: Sampling, end_ids: set[int]) -> None:
        self.tokenizer, self.sampling, self.end_ids = tokenizer, sampling, end_ids
        self.generator = torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else torch.seed() % 2**63)
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.pending: list[TokenLogprob] = []
        self.done = False

    def _piece(self, text: str, finish: str | None) -> Piece:
        piece = Piece(text, self.pending, finish, len(self.tokens))
        self.pending = []
        self.done = finish is not None
        return piece

    def advance(self, logits: torch.Tensor) -> Piece | None:
        """Pick the next token from ``logits`` ``[vocab]``; the text it releases (if any)."""
        token = _pick(logits, self.sampling, self.generator)
        if token in self.end_ids:
            return self._piece(self.tokenizer.decode(self.tokens, skip_special_tokens=True)[self.sent :], "stop")
        self.tokens.append(token)
        if self.sampling.top_logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            top = logp.topk(self.sampling.top_logprobs) if self.sampling.top_logprobs else None
            self.pending.append(TokenLogprob(self.tokenizer.decode([token]), float(logp[token]),
                                             [] if top is None else [(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices)]))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hit = min((text.find(s) for s in self.sampling.stop if s in text), default=-1)
        if hit >= 0:
            return self._piece(text[self.sent : hit], "stop")
        if len(self.tokens) >= self.sampling.max_tokens:
            return self._piece(text[self.sent :], "length")
        ready = len(text) - _held_back(text, self.sampling.stop)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            ready = min(ready, len(text) - 1)
        if ready <= self.sent:
            return None
        piece, self.sent = self._piece(text[self.sent : ready], None), ready
        return piece

    @property
    def last_token(self) -> int:
        return self.tokens[-1]


@torch.no_grad()
def decode_batch(model: torch.nn.Module, tokenizer, prompts: list[torch.Tensor], samplings: list[Sampling]) -> Iterator[tuple[int, Piece]]:
    """Decode several prompts (each ``[1, T_i]``) together: ``(row, piece)`` as text is released,
    each row's last piece saying why it ended.

    Decoding a small model on a CPU is memory-bound (every token reads all the weights), so one
    forward for the whole batch costs about what one row costs alone. Prompts are left-padded
    with an attention mask and explicit positions, so each row computes what it would alone;
    a finished row idles (its slot keeps a padding token) until the batch ends.
    """
    end_ids = _end_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(end_ids, default=0)
    device = prompts[0].device
    longest = max(p.shape[1] for p in prompts)
    step_input = torch.full((len(prompts), longest), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(step_input)
    for i, prompt in enumerate(prompts):
        step_input[i, longest - prompt.shape[1] :] = prompt[0]
        mask[i, longest - prompt.shape[1] :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = [_Row(tokenizer, sampling, end_ids) for sampling in samplings]
    cache, cache_arg = None, "cache"
    while not all(row.done for row in rows):
        kwargs = {cache_arg: cache} if cache is not None else {}
        out = model(input_ids=step_input, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs)
        cache, cache_arg = kv_cache_of(model, out)
        logits = out.logits[:, -1].float()
        for i, row in enumerate(rows):
            if not row.done and (piece := row.advance(logits[i])) is not None:
                yield i, piece
        step_input = torch.tensor([[pad if row.done else row.last_token] for row in rows], device=device)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1


def decode(model: torch.nn.Module, tokenizer, input_ids: torch.Tensor, sampling: Sampling) -> Iterator[Piece]:
    """Pieces of the continuation of ``input_ids`` ``[1, T]``; the last one says why it ended."""
    for _, piece in decode_batch(model, tokenizer, [input_ids], [sampling]):
        yield piece
