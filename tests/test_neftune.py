"""NEFTune: noise of the stated scale on real tokens only, in training only; a run with it trains."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train_helpers import write_chat_data
from tunelab.models import load_model
from tunelab.recipe import recipe_from_dict
from tunelab.train.neftune import NEFTune, NEFTuneConfig, token_lengths
from tunelab.train.run import run_training


def test_token_lengths_for_padded_and_packed_batches():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert token_lengths((2, 4), mask, None).tolist() == [[3, 3, 3, 0], [4, 4, 4, 4]]
    packed = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert token_lengths((1, 6), None, packed).tolist() == [[3, 3, 3, 2, 2, 1]]
    assert token_lengths((1, 5), None, None).tolist() == [[5] * 5]


def _embedding_outputs(model, ids, mask, train: bool) -> torch.Tensor:
    captured = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    model.train(train)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    return captured[0]


def test_noise_has_the_stated_scale_spares_padding_and_is_off_in_eval():
    model = load_model("tiny-llama", seed=0).model
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (2, 200))
    mask = torch.ones_like(ids)
    mask[0, 120:] = 0
    clean = _embedding_outputs(model, ids, mask, train=False)
    neftune = NEFTune(NEFTuneConfig(alpha=5.0))
    neftune.attach(model)
    noise = _embedding_outputs(model, ids, mask, train=True) - clean
    width = clean.shape[-1]
    for row, length in ((0, 120), (1, 200)):
        bound = 5.0 / math.sqrt(length * width)
        values = noise[row, :length]
        assert float(values.abs().max()) <= bound * (1 + 1e-5) and float(values.abs().max()) > 0.95 * bound
        assert float(values.pow(2).mean()) == pytest.approx(bound**2 / 3, rel=0.05)  # uniform on [-b, b]
    assert torch.equal(noise[0, 120:], torch.zeros_like(noise[0, 120:]))
    assert torch.equal(_embedding_outputs(model, ids, mask, train=False), clean)  # evaluation: no noise
    neftune.detach()
    assert torch.equal(_embedding_outputs(model, ids, mask, train=True), clean)  # removed after training


def test_a_recipe_trains_with_neftune_and_evaluates_without_it(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=64)
    base = {
        "model": {"name": "tiny-llama"}, "method": {"lora": {"r": 4}}, "data": {"train": str(data), "val_fraction": 0.25},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 0.01, "threads": 1, "precision": "fp32"},
    }
    noisy = run_training(recipe_from_dict({**base, "callbacks": [{"name": "neftune", "alpha": 5}], "output_dir": str(tmp_path / "a")}), show_progress=False)
    plain = run_training(recipe_from_dict({**base, "output_dir": str(tmp_path / "b")}), show_progress=False)
    assert noisy.eval_before == plain.eval_before  # no noise while evaluating
    assert noisy.final_train_loss != plain.final_train_loss  # but training saw it
    assert noisy.eval_after["eval_loss"] < noisy.eval_before["eval_loss"]
