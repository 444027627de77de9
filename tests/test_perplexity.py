"""Perplexity is the exact mean token NLL, whatever the batching and windowing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tunelab.errors import UserError
from tunelab.evaluate.perplexity import perplexity, plan_windows
from tunelab.models import load_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "A somewhat longer sentence, so that padding matters when it is batched with short ones.",
]


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-llama", seed=1)
    return loaded.model, loaded.tokenizer


def direct_nll(model, ids: list[int], begin: int = 0, first_target: int = 1, end: int | None = None) -> tuple[float, int]:
    """Summed NLL of ids[first_target:end] given ids[begin:...], one unpadded forward."""
    end = len(ids) if end is None else end
    window = torch.tensor([ids[begin:end]])
    with torch.no_grad():
        logits = model(input_ids=window).logits[0]
    offset = first_target - begin
    logp = F.log_softmax(logits[offset - 1 : -1], dim=-1)
    target = window[0, offset:]
    return -logp.gather(1, target[:, None]).sum().item(), len(target)


def test_matches_direct_computation_for_every_batch_size(tiny):
    model, tok = tiny
    pairs = [direct_nll(model, tok(t)["input_ids"]) for t in TEXTS]
    expected = sum(p[0] for p in pairs) / sum(p[1] for p in pairs)
    for batch_size in (1, 2, 3):
        result = perplexity(model, tok, TEXTS, batch_size=batch_size)
        assert result["tokens"] == sum(len(tok(t)["input_ids"]) - 1 for t in TEXTS)
        assert result["nll"] == pytest.approx(expected, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
        assert result["bits_per_token"] == pytest.approx(expected / math.log(2), rel=1e-5)


def test_windows_score_each_token_once_with_enough_context():
    for n, max_length, stride in [(100, 16, 8), (17, 16, 15), (5, 16, 8), (64, 8, 1)]:
        windows = plan_windows(n, max_length, stride)
        scored = [p for w in windows for p in range(w.first_target, w.end)]
        assert scored == list(range(1, n))
        for w in windows:
            assert w.end - w.begin <= max_length
            if w.begin > 0:
                assert w.first_target - w.begin >= max_length - stride


def test_sliding_window_equals_direct_scoring_of_each_window(tiny):
    model, tok = tiny
    text = TEXTS[2] * 3
    ids = tok(text)["input_ids"]
    windows = plan_windows(len(ids), 32, 12)
    assert len(windows) > 3
    total = [direct_nll(model, ids, w.begin, w.first_target, w.end) for w in windows]
    expected = sum(t[0] for t in total) / sum(t[1] for t in total)
    short_text = "Hello there, fox."  # fits one window, so it is scored with full context
    result = perplexity(model, tok, [text, short_text], max_length=32, stride=12, batch_size=3)
    short = direct_nll(model, tok(short_text)["input_ids"])
    both = (sum(t[0] for t in total) + short[0]) / (sum(t[1] for t in total) + short[1])
    assert result["nll"] == pytest.approx(both, rel=1e-5)
    alone = perplexity(model, tok, [text], max_length=32, stride=12)
    assert alone["nll"] == pytest.approx(expected, rel=1e-5)


def test_bad_settings_are_user_errors(tiny):
    model, tok = tiny
    with pytest.raises(UserError, match="stride"):
        perplexity(model, tok, TEXTS, max_length=16, stride=16)
    with pytest.raises(UserError, match="no tokens"):
        perplexity(model, tok, ["", "a"])
