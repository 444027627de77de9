"""Batched generation gives each prompt the text it would get alone, cut at stop strings."""

from __future__ import annotations

import pytest

from tunelab.evaluate.generation import generate_batch
from tunelab.generate import GenerationSettings

PROMPTS = ["Q: what is two plus two?\nA:", "Hi", "A much longer prompt, so that the short ones are left-padded in a batch:"]


def outputs(model, tokenizer, batch_size, stop=()):
    settings = GenerationSettings(max_new_tokens=8)
    return generate_batch(model, tokenizer, PROMPTS, settings, stop=stop, add_special_tokens=True, batch_size=batch_size)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-bloom"])
def tiny(request):
    from tunelab.models import load_model

    loaded = load_model(request.param, seed=11)
    return loaded.model, loaded.tokenizer


def test_left_padded_batches_equal_one_prompt_at_a_time(tiny):
    model, tok = tiny
    alone = outputs(model, tok, batch_size=1)
    assert outputs(model, tok, batch_size=3) == alone
    assert all(alone)  # something was generated for every prompt


def test_stop_strings_end_the_text(tiny):
    model, tok = tiny
    full = outputs(model, tok, batch_size=3)
    stop = full[0][2:4]  # a piece of the first output: the text ends right before its first occurrence
    cut = outputs(model, tok, batch_size=3, stop=[stop])
    for whole, text in zip(full, cut):
        assert text == (whole[: whole.find(stop)] if stop in whole else whole)


@pytest.mark.slow
def test_smollm2_answers_a_batch_like_one_prompt_at_a_time():
    from tunelab.models import load_model

    loaded = load_model("smollm2-135m")
    prompts = [
        loaded.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("What is the capital of France?", "Name a primary colour.")
    ]
    settings = GenerationSettings(max_new_tokens=12)
    run = lambda n: generate_batch(loaded.model, loaded.tokenizer, prompts, settings, stop=["\n"], add_special_tokens=False, batch_size=n)  # noqa: E731
    alone = run(1)
    assert run(2) == alone
    assert "Paris" in alone[0]
