"""Optimizer groups and schedules do what the recipe says."""

import math

import pytest
import torch

from tunelab.models import load_model
from tunelab.train.config import TrainConfig
from tunelab.train.optim import build_optimizer, lr_multiplier, parameter_groups
from tunelab.train.optimizers import OPTIMIZERS


def names_by_group(model, groups):
    ids = {id(p): n for n, p in model.named_parameters()}
    return [([ids[id(p)] for p in g["params"]], g) for g in groups]


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = load_model("tiny-bert", "base").model
    groups = parameter_groups(model, TrainConfig(lr=1e-3, weight_decay=0.1))
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
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3))
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in model.model.layers[0].parameters())


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_optimizer_choice(name, cls):
    optimizer = build_optimizer(load_model("tiny-llama").model, TrainConfig(optimizer=name, lr=1e-3, nesterov=name == "sgd"))
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


def _one_step(optimizer_class, **settings):
    """A parameter after two steps of ``optimizer_class`` on fixed gradients (the second uses the momentum)."""
    param = torch.nn.Parameter(torch.tensor([0.5, -0.2, 0.0, 3.0]))
    optimizer = optimizer_class([param], **settings)
    for grad in ([0.3, -0.1, 0.2, -4.0], [-0.5, -0.1, 0.1, 1.0]):
        param.grad = torch.tensor(grad)
        optimizer.step()
    return param.detach()


def test_sign_optimizers_take_the_steps_their_papers_define():
    from tunelab.train.sign_optimizers import Lion, SignMomentum

    p0, g1, g2 = torch.tensor([0.5, -0.2, 0.0, 3.0]), torch.tensor([0.3, -0.1, 0.2, -4.0]), torch.tensor([-0.5, -0.1, 0.1, 1.0])
    lr, wd = 0.1, 0.01
    # Lion: update = sign(b1*m + (1-b1)*g); m <- b2*m + (1-b2)*g; decoupled decay
    m, p = torch.zeros(4), p0.clone()
    for g in (g1, g2):
        p = p * (1 - lr * wd) - lr * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
    assert torch.allclose(_one_step(Lion, lr=lr, weight_decay=wd), p)
    # Signum: m <- b*m + (1-b)*g; p <- p - lr*sign(m); signSGD: sign of the gradient itself
    m, p = torch.zeros(4), p0.clone()
    for g in (g1, g2):
        m = 0.9 * m + 0.1 * g
        p = p - lr * torch.sign(m)
    assert torch.allclose(_one_step(SignMomentum, lr=lr, momentum=0.9), p)
    assert torch.allclose(_one_step(SignMomentum, lr=lr, momentum=0.0), p0 - lr * torch.sign(g1) - lr * torch.sign(g2))


def test_adafactor_takes_the_steps_its_paper_defines():
    """Shazeer & Stern (2018), Algorithm 4 with relative steps and update clipping: factored second
    moments R (row sums) and C (column sums), V = R C / sum(R), beta2_t = 1 - t^-0.8,
    rho_t = min(lr, 1/sqrt(t)), alpha_t = max(eps2, RMS(x)) rho_t, U = G / sqrt(V), clipped by RMS(U)/d."""
    torch.manual_seed(0)
    x0 = torch.randn(4, 3)
    grads = [torch.randn(4, 3) for _ in range(3)]
    lr, eps2, d = 0.05, 1e-3, 1.0
    x, r, c = x0.clone(), torch.zeros(4), torch.zeros(3)
    for t, g in enumerate(grads, start=1):
        beta2 = 1 - t**-0.8
        alpha = max(eps2, float(x.pow(2).mean().sqrt())) * min(lr, t**-0.5)
        r = beta2 * r + (1 - beta2) * (g * g).sum(1)
        c = beta2 * c + (1 - beta2) * (g * g).sum(0)
        u = g / (torch.outer(r, c) / r.sum()).sqrt()
        x = x - alpha * u / max(1.0, float(u.pow(2).mean().sqrt()) / d)
    param = torch.nn.Parameter(x0.clone())
    optimizer = OPTIMIZERS.get("adafactor")([{"params": [param], "lr": lr, "weight_decay": 0.0}], TrainConfig(optimizer="adafactor", lr=lr))
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
    assert torch.allclose(param.detach(), x, atol=1e-6)


#: Sign-based optimizers take steps of size lr per coordinate; Adafactor's lr is relative to the weights' RMS.
LR_FOR = {"lion": 0.002, "signum": 0.002, "signsgd": 0.002, "adafactor": 0.02, "adamw8bit": 0.02}


@pytest.mark.parametrize("name", list(LR_FOR))
def test_every_registered_optimizer_trains_from_the_recipe(tmp_path, name):
    from tests.train_helpers import train, write_chat_data

    data = write_chat_data(tmp_path / "d.jsonl", n=48)
    summary = train(tmp_path, (
        f"model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.2}}\nmethod: {{lora: {{r: 4}}}}\n"
        f"train: {{optimizer: {name}, lr: {LR_FOR[name]}, max_steps: 10, batch_size: 4, precision: fp32, threads: 1, eval_before: true}}\n"
    ))
    assert summary.eval_after["eval_loss"] < summary.eval_before["eval_loss"]


@pytest.mark.parametrize("name", ["adamw", "lion", "signum", "signsgd", "adafactor", "adamw8bit"])
def test_gradual_pruning_composes_with_every_optimizer_and_the_summary_reports_its_memory(tmp_path, name):
    """Full fine-tuning while pruning to 50%: the saved model has the sparsity, the summary the
    optimizer's measured state (AdamW two fp32 moments, 8-bit AdamW two bytes, sign methods at most one moment)."""
    from tests.train_helpers import train, write_chat_data
    from tunelab.compress.targets import linear_layers
    from tunelab.models import load_run

    data = write_chat_data(tmp_path / "d.jsonl", n=48)
    summary = train(tmp_path, (
        f"model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.2}}\n"
        "compress: {gradual: {sparsity: 0.5, start_step: 2, end_step: 6, every: 2, targets: [mlp]}}\n"
        f"train: {{optimizer: {name}, lr: {LR_FOR.get(name, 0.001)}, max_steps: 6, batch_size: 4, precision: fp32, threads: 1, eval_before: false}}\n"
    ))
    model, _, _ = load_run(tmp_path / "run")
    for layer_name, layer in linear_layers(model, ["mlp"]).items():
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01), layer_name
    per_param = summary.optimizer_state_bytes / summary.trainable_params
    expected = {"adamw": (8.0, 8.1), "lion": (4.0, 4.1), "signum": (4.0, 4.1), "signsgd": (0.0, 0.1), "adafactor": (0.1, 4.1), "adamw8bit": (1.9, 3.0)}[name]
    assert expected[0] <= per_param <= expected[1], per_param


def test_an_unknown_optimizer_is_a_one_line_error_naming_the_choices(tmp_path):
    from tunelab.errors import UserError
    from tunelab.recipe import load_recipe

    (tmp_path / "r.yaml").write_text("model: {name: tiny-llama}\ndata: {train: d.jsonl}\ntrain: {optimizer: lino}\n")
    with pytest.raises(UserError, match="train.optimizer.*unknown optimizer 'lino'.*lion"):
        load_recipe(tmp_path / "r.yaml")
