"""Optimizer groups and schedules do what the recipe says."""

import math

import pytest
import torch

from tunelab.models import load_model
from tunelab.train.config import TrainConfig
from tunelab.train.optim import build_optimizer, lr_multiplier, parameter_groups


def names_by_group(model, groups):
    ids = {id(p): n for n, p in model.named_parameters()}
    return [([ids[id(p)] for p in g["params"]], g) for g in groups]


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = load_model("tiny-bert", "base").model
    groups = parameter_groups(model, TrainConfig(weight_decay=0.1))
    for names, group in names_by_group(model, groups):
        for name in names:
            exempt = "LayerNorm" in name or name.endswith("bias") or "embeddings" in name
            assert group["weight_decay"] == (0.0 if exempt else 0.1), name


def test_layer_wise_lr_decay_raises_lr_with_depth():
    model = load_model("tiny-llama").model
    groups = parameter_groups(model, TrainConfig(lr=1.0, layer_lr_decay=0.5))
    lr_of = {n: g["lr"] for names, g in names_by_group(model, groups) for n in names}
    assert lr_of["model.layers.1.mlp.up_proj.weight"] == 1.0  # last block: full rate
    assert lr_of["model.layers.0.mlp.up_proj.weight"] == 0.5
    assert lr_of["model.embed_tokens.weight"] == 0.25
    assert lr_of["model.norm.weight"] == 1.0


def test_frozen_parameters_get_no_optimizer_state():
    model = load_model("tiny-llama").model
    model.model.layers[0].requires_grad_(False)
    optimizer = build_optimizer(model, TrainConfig())
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in model.model.layers[0].parameters())


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_optimizer_choice(name, cls):
    optimizer = build_optimizer(load_model("tiny-llama").model, TrainConfig(optimizer=name, nesterov=name == "sgd"))
    assert isinstance(optimizer, cls)


def test_schedules_with_warmup():
    cfg = TrainConfig(schedule="cosine", warmup_steps=10)
    assert lr_multiplier(0, 110, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, 110, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, 110, cfg) == pytest.approx(0.5)
    assert lr_multiplier(110, 110, cfg) == pytest.approx(0.0, abs=1e-12)
    linear = TrainConfig(schedule="linear", warmup_ratio=0.1, min_lr_ratio=0.1)
    assert lr_multiplier(55, 100, linear) == pytest.approx(0.1 + 0.9 * (1 - 45 / 90))
    assert lr_multiplier(50, 100, TrainConfig(schedule="constant")) == 1.0
    assert math.isclose(lr_multiplier(3, 100, TrainConfig(warmup_ratio=0.1)), 0.4)
