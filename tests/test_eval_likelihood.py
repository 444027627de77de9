"""Batched option scoring equals one unpadded forward per option, and picks by likelihood."""

from __future__ import annotations

import pytest
import torch

from tunelab.evaluate.likelihood import continuation_logprobs, split_tokens
from tunelab.models import load_model


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-bloom"])  # rotary positions and ALiBi
def tiny(request):
    loaded = load_model(request.param, seed=3)
    return loaded.model, loaded.tokenizer


def direct_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log P(token) over the continuation's tokens, one sequence at a time, no padding."""
    head, tail = split_tokens(tokenizer, context, continuation, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([head + tail])).logits[0]
    logprobs = torch.log_softmax(logits, -1)
    return sum(logprobs[len(head) - 1 + j, t].item() for j, t in enumerate(tail))


REQUESTS = [
    ("Question: is the sky blue?\nAnswer:", " yes"),
    ("Question: is the sky blue?\nAnswer:", " no"),  # shares the context: one pass for both options
    ("Q: 2+2?\nA:", " four, obviously"),
    ("Short", " a much longer continuation than its context, to force padding"),
]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_scores_equal_unbatched_forward(tiny, batch_size):
    model, tok = tiny
    scored = continuation_logprobs(model, tok, REQUESTS, add_special_tokens=False, batch_size=batch_size)
    for (ctx, cont), result in zip(REQUESTS, scored):
        assert result.logprob == pytest.approx(direct_logprob(model, tok, ctx, cont), abs=1e-4)
        assert result.chars == len(cont)
        assert result.tokens == len(split_tokens(tok, ctx, cont, False)[1])


def test_continuation_tokens_are_those_of_the_joined_text(tiny):
    _, tok = tiny
    head, tail = split_tokens(tok, "Answer:", " yes", add_special_tokens=False)
    assert tok.decode(head) == "Answer:" and tok.decode(tail) == " yes"
