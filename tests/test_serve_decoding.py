"""The service's decoding loop: a batch decodes each row as it would alone; stop strings, seeds
and limits behave as OpenAI documents them."""

import pytest
import torch

from tunelab.generate import encode_prompt
from tunelab.models import load_model
from tunelab.serve.decoding import Sampling, decode, decode_batch


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-llama", "causal-lm", seed=3)
    loaded.model.eval()
    return loaded.model, loaded.tokenizer


def prompt(tokenizer, text: str) -> torch.Tensor:
    return encode_prompt(tokenizer, [{"role": "user", "content": text}])


def alone(model, tokenizer, ids, sampling):
    parts = list(decode(model, tokenizer, ids, sampling))
    return "".join(p.text for p in parts), parts[-1].finish_reason, [lp.logprob for p in parts for lp in p.logprobs]


def test_a_batch_decodes_each_row_as_it_would_alone(tiny):
    model, tokenizer = tiny
    prompts = [prompt(tokenizer, t) for t in ("hi", "a much longer question about the weather today", "ok?")]
    samplings = [Sampling(max_tokens=n, temperature=0, top_logprobs=2) for n in (6, 3, 8)]
    texts, finishes, logprobs = {}, {}, {i: [] for i in range(3)}
    for row, piece in decode_batch(model, tokenizer, prompts, samplings):
        texts[row] = texts.get(row, "") + piece.text
        logprobs[row] += [lp.logprob for lp in piece.logprobs]
        if piece.finish_reason:
            finishes[row] = piece.finish_reason
    for row, (ids, sampling) in enumerate(zip(prompts, samplings)):
        text, finish, expected = alone(model, tokenizer, ids, sampling)
        assert texts[row] == text and finishes[row] == finish
        assert logprobs[row] == pytest.approx(expected, abs=1e-4)


def test_seeded_sampling_does_not_depend_on_the_batch(tiny):
    model, tokenizer = tiny
    ids = prompt(tokenizer, "tell me")
    sampling = Sampling(max_tokens=8, temperature=1.0, top_p=0.9, seed=11)
    text, _, _ = alone(model, tokenizer, ids, sampling)
    other = Sampling(max_tokens=5, temperature=1.0, seed=99)
    batched = "".join(p.text for row, p in decode_batch(model, tokenizer, [prompt(tokenizer, "x"), ids], [other, sampling]) if row == 1)
    assert batched == text
    assert alone(model, tokenizer, ids, sampling)[0] == text  # and twice alone


def test_stop_strings_cut_the_text_and_limits_say_length(tiny):
    model, tokenizer = tiny
    ids = prompt(tokenizer, "hello there")
    full, finish, _ = alone(model, tokenizer, ids, Sampling(max_tokens=12, temperature=0))
    assert finish == "length" and len(tokenizer(full, add_special_tokens=False)["input_ids"]) <= 12
    stop = full[3:5]
    cut, finish, _ = alone(model, tokenizer, ids, Sampling(max_tokens=12, temperature=0, stop=(stop,)))
    assert finish == "stop" and cut == full[: full.find(stop)]
