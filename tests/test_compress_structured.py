"""Structured pruning shrinks the matrices, keeps the config true, and reloads with plain transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.compress_helpers import calibration_chunks
from tunelab.compress import calibration, structured
from tunelab.errors import UserError
from tunelab.models import load_model


@pytest.fixture()
def tiny():
    return load_model("tiny-llama", seed=0)


@pytest.fixture(scope="module")
def chunks():
    return calibration_chunks(64, 2)


def reload_and_compare(model, tmp_path, chunks) -> AutoModelForCausalLM:
    """Save, reload with plain transformers, check the reloaded model computes the same and generates."""
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=chunks[:1]).logits, model(input_ids=chunks[:1]).logits, atol=1e-5)
    assert reloaded.generate(chunks[:1, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)
    return reloaded


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mlp_channels_shrink_every_block(tiny, chunks, tmp_path):
    before = n_params(tiny.model)
    report = structured.prune_mlp_channels(tiny.model, 0.25, chunks)
    assert report == {"intermediate_size_before": 128, "intermediate_size_after": 96}
    for block in tiny.model.model.layers:
        assert block.mlp.up_proj.weight.shape == (96, 64)
        assert block.mlp.down_proj.weight.shape == (64, 96)
    assert n_params(tiny.model) == before - 2 * 3 * 32 * 64
    reloaded = reload_and_compare(tiny.model, tmp_path, chunks)
    assert reloaded.config.intermediate_size == 96


def test_mlp_pruning_keeps_the_most_important_channels(tiny, chunks):
    down = tiny.model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        down.weight[:, 5] = 0  # a channel whose output is always zero cannot matter
    kept_before = tiny.model.model.layers[0].mlp.up_proj.weight.clone()
    structured.prune_mlp_channels(tiny.model, 1 / 128, chunks)
    assert not any(torch.equal(row, kept_before[5]) for row in tiny.model.model.layers[0].mlp.up_proj.weight)


def test_heads_remove_whole_kv_groups(tiny, chunks, tmp_path):
    report = structured.prune_heads(tiny.model, 0.5, chunks)
    assert report == {"heads_before": 4, "heads_after": 2}
    attn = tiny.model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (2 * 16, 64)
    assert attn.k_proj.weight.shape == (16, 64)
    assert attn.o_proj.weight.shape == (64, 32)
    reloaded = reload_and_compare(tiny.model, tmp_path, chunks)
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads, reloaded.config.head_dim) == (2, 1, 16)


def test_blocks_drop_the_least_influential(tiny, chunks, tmp_path):
    influence = calibration.block_influence(tiny.model, tiny.model.model.layers, chunks)
    report = structured.prune_blocks(tiny.model, 0.5, chunks)
    assert report["blocks_removed"] == [int(influence.argmin())]
    assert len(tiny.model.model.layers) == 1
    assert tiny.model.model.layers[0].self_attn.layer_idx == 0
    assert reload_and_compare(tiny.model, tmp_path, chunks).config.num_hidden_layers == 1


def test_unsupported_architecture_and_too_small_fractions_are_user_errors(chunks):
    bloom = load_model("tiny-bloom").model
    with pytest.raises(UserError, match="Llama-style"):
        structured.prune_mlp_channels(bloom, 0.25)
    with pytest.raises(UserError, match="removes no head group"):
        structured.prune_heads(load_model("tiny-llama").model, 0.1)
    with pytest.raises(UserError, match="sparsity must be in"):
        structured.prune_blocks(load_model("tiny-llama").model, 1.0, chunks)
