"""Unstructured and N:M pruning: exact sparsity, exact patterns, importance that means something."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.compress_helpers import calibration_chunks
from tunelab.compress.masks import lowest, nm_mask, parse_nm, sampled
from tunelab.compress.prune import prune_weights, select
from tunelab.compress.store import save_compressed
from tunelab.compress.targets import linear_layers
from tunelab.errors import UserError
from tunelab.models import load_model


@pytest.fixture()
def tiny():
    return load_model("tiny-llama", seed=0)


@pytest.fixture(scope="module")
def chunks():
    return calibration_chunks(64, 4)


def zero_fraction(t: torch.Tensor) -> float:
    return float((t == 0).float().mean())


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "taylor"])
def test_every_layer_gets_exactly_the_requested_sparsity(tiny, chunks, criterion):
    masks = prune_weights(tiny.model, criterion, 0.375, chunks=chunks)
    layers = linear_layers(tiny.model)
    assert set(masks) == set(layers) and "lm_head" not in masks
    for name, layer in layers.items():
        assert zero_fraction(layer.weight) == 0.375, name
        assert torch.equal(layer.weight != 0, masks[name])


def test_wanda_is_exact_per_output_row_and_differs_from_magnitude(tiny, chunks):
    magnitude = prune_weights(load_model("tiny-llama", seed=0).model, "magnitude", 0.5, scope="row")
    wanda = prune_weights(tiny.model, "wanda", 0.5, chunks=chunks)
    weight = tiny.model.model.layers[0].mlp.down_proj.weight
    assert ((weight == 0).sum(1) == weight.shape[1] // 2).all()
    name = "model.layers.0.mlp.down_proj"
    assert not torch.equal(wanda[name], magnitude[name])  # activations change which weights matter


def test_global_sparsity_is_exact_overall_but_uneven_across_layers():
    scores = {"a": torch.rand(8, 16), "b": torch.rand(4, 16) * 10}
    masks = select(scores, 0.5, scope="global")
    removed = sum(int((~m).sum()) for m in masks.values())
    assert removed == (8 * 16 + 4 * 16) // 2
    assert int((~masks["a"]).sum()) > int((~masks["b"]).sum())  # small scores are pruned first wherever they are


def test_nm_pattern_keeps_exactly_n_of_every_m(tiny, chunks):
    prune_weights(tiny.model, "wanda", pattern="2:4", chunks=chunks)
    for name, layer in linear_layers(tiny.model).items():
        groups = (layer.weight != 0).view(-1, 4).sum(1)
        assert (groups == 2).all(), name


def test_nm_keeps_the_largest_scores():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 8.0, 5.0, 6.0, 7.0]])
    assert nm_mask(scores, 1, 4).tolist() == [[False, True, False, False, True, False, False, False]]


def test_sampled_pruning_is_exact_seeded_and_prefers_unimportant_weights():
    importance = torch.linspace(0.01, 1, 10_000).view(100, 100)
    generator = torch.Generator().manual_seed(0)
    mask = sampled(importance, 0.5, temperature=1.0, generator=generator)
    assert int((~mask).sum()) == 5000
    low_half_pruned = (~mask).flatten()[:5000].float().mean()
    high_half_pruned = (~mask).flatten()[5000:].float().mean()
    assert low_half_pruned > high_half_pruned
    assert not torch.equal(mask, lowest(importance, 0.5))  # random, not a threshold
    again = sampled(importance, 0.5, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)


def test_taylor_with_a_teacher_prunes_differently_from_the_task_loss(chunks):
    teacher = load_model("tiny-llama", seed=7).model
    by_loss = prune_weights(load_model("tiny-llama", seed=0).model, "taylor", 0.5, chunks=chunks)
    by_teacher = prune_weights(load_model("tiny-llama", seed=0).model, "taylor", 0.5, chunks=chunks, teacher=teacher)
    name = "model.layers.1.mlp.up_proj"
    assert not torch.equal(by_loss[name], by_teacher[name])


def test_saved_model_has_no_mask_copies_and_the_reported_sparsity(tiny, tmp_path):
    prune_weights(tiny.model, "magnitude", 0.5, targets=[r"mlp\."])
    save_compressed(tiny.model, tiny.tokenizer, tmp_path / "m")
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert not any("orig" in key or "mask" in key for key in saved)
    mlp = [v for k, v in saved.items() if ".mlp." in k]
    assert sum(int((v == 0).sum()) for v in mlp) == sum(v.numel() for v in mlp) // 2
    assert zero_fraction(saved["model.layers.0.self_attn.q_proj.weight"]) == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: prune_weights(m, "magnitude", 1.0), "sparsity must be in"),
        (lambda m: prune_weights(m, "magnitude", -0.1), "sparsity must be in"),
        (lambda m: prune_weights(m, "magnitude", pattern="4:4"), "0 < N < M"),
        (lambda m: prune_weights(m, "magnitude", pattern="2:3"), "multiple of M"),
        (lambda m: prune_weights(m, "magnitude", 0.5, targets=["no_such_layer"]), "matches no linear layer"),
        (lambda m: prune_weights(m, "wanda", 0.5), "needs calibration"),
        (lambda m: prune_weights(m, "sparsegpt", 0.5), "unknown pruning criterion"),
    ],
)
def test_bad_input_is_a_one_line_user_error(tiny, call, message):
    with pytest.raises(UserError, match=message) as info:
        call(tiny.model)
    assert "\n" not in str(info.value)


def test_nm_parsing():
    assert parse_nm("2:4") == (2, 4)
    with pytest.raises(UserError):
        parse_nm("2-4")
