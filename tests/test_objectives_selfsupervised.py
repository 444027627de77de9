"""Self-supervised objectives: masked LM for encoders, causal-LM continued pretraining on raw text."""

import json
import random

import pytest

from tests.train_helpers import train
from tunelab.errors import UserError

PATTERNS = ["abc abc abc", "xyz xyz xyz", "mno mno mno"]


def write_text(path, n=160, seed=0):
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(PATTERNS) for _ in range(2))}) + "\n" for _ in range(n)))
    return path


@pytest.mark.parametrize("whole_word", [False, True])
def test_masked_lm_learns_to_fill_in_tokens(tmp_path, whole_word):
    data = write_text(tmp_path / "t.jsonl")
    summary = train(
        tmp_path,
        f"model: {{name: tiny-bert}}\ndata: {{train: {data}, val_fraction: 0.2, dedup: false}}\n"
        "method: {head: {type: masked_lm}}\n"
        f"objective: {{name: masked_lm, mask_rate: 0.2, whole_word: {str(whole_word).lower()}}}\n"
        "train: {lr: 0.003, max_steps: 40, batch_size: 16, schedule: constant, precision: fp32}\n",
    )
    before, after = summary.eval_before, summary.eval_after
    assert after["eval_masked_accuracy"] > 0.3 > before["eval_masked_accuracy"], (before, after)  # chance: 1/263 ids
    assert after["eval_loss"] < before["eval_loss"] - 1.0


def test_masked_lm_refuses_decoders(tmp_path):
    data = write_text(tmp_path / "t.jsonl", n=20)
    with pytest.raises(UserError, match="masked_lm needs an encoder"):
        train(tmp_path, f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\nmethod: {{head: {{type: masked_lm}}}}\n")


def test_causal_lm_continued_pretraining_on_raw_text(tmp_path):
    data = write_text(tmp_path / "t.jsonl")
    summary = train(
        tmp_path,
        f"model: {{name: tiny-llama}}\ndata: {{train: {data}, format: text, val_fraction: 0.2, dedup: false}}\n"
        "train: {lr: 0.003, max_steps: 30, batch_size: 8, schedule: constant, precision: fp32}\n",
    )
    assert summary.data["supervised_tokens"] >= summary.data["tokens"] - summary.data["train_examples"]  # every token learned
    assert summary.eval_after["eval_perplexity"] < 0.5 * summary.eval_before["eval_perplexity"], summary.eval_after
