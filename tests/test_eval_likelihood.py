"""Option scoring: equal to one unpadded forward per option, with each prompt run only once."""

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
    # Counted from the end: prompt tuning puts virtual tokens in front of the sequence's logits.
    return sum(logprobs[j - len(tail) - 1, t].item() for j, t in enumerate(tail))


REQUESTS = [
    ("Question: is the sky blue?\nAnswer:", " yes"),
    ("Question: is the sky blue?\nAnswer:", " no"),  # shares the context: one pass for both options
    ("Q: 2+2?\nA:", " four, obviously"),
    ("Short", " a much longer continuation than its context, to force padding"),
    ("Q: 2+2?\nA:", " five, surely not"),  # a second multi-token option of an earlier prompt
]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_scores_equal_unbatched_forward(tiny, batch_size):
    model, tok = tiny
    scored = continuation_logprobs(model, tok, REQUESTS, add_special_tokens=False, batch_size=batch_size)
    for (ctx, cont), result in zip(REQUESTS, scored):
        assert result.logprob == pytest.approx(direct_logprob(model, tok, ctx, cont), rel=1e-6, abs=1e-5)  # fp32 sums of up to 17 tokens; a padded batch and one row run different GEMM blockings (AVX-512: 1.7e-7 apart)
        assert result.chars == len(cont)
        assert result.tokens == len(split_tokens(tok, ctx, cont, False)[1])


def test_continuation_tokens_are_those_of_the_joined_text(tiny):
    _, tok = tiny
    head, tail = split_tokens(tok, "Answer:", " yes", add_special_tokens=False)
    assert tok.decode(head) == "Answer:" and tok.decode(tail) == " yes"


def test_each_prompt_runs_once_and_options_run_only_their_tokens(tiny):
    """Four multi-token options of one prompt: the model reads the prompt once, then k·(n-1) tokens."""
    model, tok = tiny
    context = "Which topic is this article about?\nAnswer:"
    options = [" earnings report", " corporate acquisition", " crude oil prices", " foreign trade"]
    fed: list[int] = []
    embeddings = model.get_input_embeddings()
    hook = embeddings.register_forward_hook(lambda module, args, output: fed.append(int(args[0].numel())))
    try:
        scored = continuation_logprobs(model, tok, [(context, o) for o in options], add_special_tokens=False, batch_size=8)
    finally:
        hook.remove()
    head, _ = split_tokens(tok, context, options[0], False)
    tails = [split_tokens(tok, context, o, False)[1] for o in options]
    assert fed[0] == len(head)  # the prompt pass
    assert sum(fed[1:]) == len(options) * (max(map(len, tails)) - 1)  # option tokens, right-padded
    for option, result in zip(options, scored):
        assert result.logprob == pytest.approx(direct_logprob(model, tok, context, option), rel=1e-6, abs=1e-5)


@pytest.mark.parametrize("family", ["PromptTuningConfig", "PrefixTuningConfig"])
def test_prompt_learning_scores_equal_its_own_forward(family):
    """Virtual tokens cannot ride in a reused cache: prompt/prefix tuning scores whole sequences, still exactly."""
    import peft

    loaded = load_model("tiny-llama", seed=3)
    model = peft.get_peft_model(loaded.model, getattr(peft, family)(task_type="CAUSAL_LM", num_virtual_tokens=4))
    scored = continuation_logprobs(model, loaded.tokenizer, REQUESTS, add_special_tokens=False, batch_size=3)
    for (ctx, cont), result in zip(REQUESTS, scored):
        assert result.logprob == pytest.approx(direct_logprob(model, loaded.tokenizer, ctx, cont), rel=1e-6, abs=1e-5)
