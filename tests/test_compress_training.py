"""Compression while training: cubic schedule, gradual pruning, lottery-ticket rewinding, QAT."""

from __future__ import annotations

import json

import pytest
import torch

import tunelab.compress.callbacks  # noqa: F401  (registers the callbacks with the trainer)
from tests.train_helpers import record_final_logits, train, write_chat_data
from tunelab.compress import lottery
from tunelab.compress.masks import lowest
from tunelab.compress.qat import convert_qat, prepare_qat, unwrap_qat
from tunelab.compress.qlinear import QuantLinear, QuantSpec
from tunelab.compress.schedule import cubic_sparsity
from tunelab.compress.targets import linear_layers
from tunelab.errors import UserError
from tunelab.models import load_model


def test_cubic_schedule_starts_and_reaches_its_targets_and_front_loads_pruning():
    kwargs = dict(initial=0.1, final=0.8, start=10, end=110)
    assert cubic_sparsity(0, **kwargs) == pytest.approx(0.1)
    assert cubic_sparsity(10, **kwargs) == pytest.approx(0.1)
    assert cubic_sparsity(110, **kwargs) == pytest.approx(0.8)
    assert cubic_sparsity(500, **kwargs) == pytest.approx(0.8)
    values = [cubic_sparsity(s, **kwargs) for s in range(10, 111, 10)]
    gains = [b - a for a, b in zip(values, values[1:])]
    assert all(g > 0 for g in gains) and gains == sorted(gains, reverse=True)
    with pytest.raises(UserError):
        cubic_sparsity(0, initial=0, final=0.5, start=5, end=5)


def test_rewinding_restores_early_weights_exactly_under_the_surviving_mask():
    model = load_model("tiny-llama", seed=0).model
    layers = linear_layers(model)
    early = lottery.snapshot(layers)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.add_(torch.randn_like(layer.weight))  # "training"
    masks = {n: lowest(layer.weight.abs(), 0.36) for n, layer in layers.items()}
    lottery.rewind(layers, early, masks)
    for name, layer in layers.items():
        assert torch.equal(layer.weight[masks[name]], early[name][masks[name]])
        assert (layer.weight[~masks[name]] == 0).all()
    assert lottery.sparsity_after(2, 0.2) == pytest.approx(0.36)


def test_qat_converted_model_equals_fake_quant_model_and_gradients_flow():
    loaded = load_model("tiny-llama", seed=0)
    model = loaded.model
    ids = torch.randint(7, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    names = prepare_qat(model, QuantSpec("int4", 32))
    assert len(names) == 14
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    up = model.model.layers[0].mlp.up_proj.linear
    assert up.weight.grad is not None and up.weight.grad.abs().sum() > 0
    with torch.no_grad():
        fake = model(input_ids=ids).logits
        convert_qat(model)
        assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
        assert torch.equal(model(input_ids=ids).logits, fake)


def test_unwrap_restores_plain_linears_with_the_trained_weights():
    model = load_model("tiny-llama", seed=0).model
    before = model.model.layers[1].self_attn.v_proj.weight
    prepare_qat(model, QuantSpec("ternary", 32), targets=[r"self_attn"])
    assert len(unwrap_qat(model)) == 8
    assert model.model.layers[1].self_attn.v_proj.weight is before


RECIPE = (
    "model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.15}}\n"
    "train: {{lr: 0.003, max_steps: {steps}, batch_size: 8, schedule: constant, precision: fp32}}\n"
    "compress: {compress}\n"
)


def final_weights(run_dir):
    from tunelab.models import load_run

    model, _, _ = load_run(run_dir)
    return {n: m.weight.detach() for n, m in linear_layers(model).items()}


def test_gradual_pruning_during_training_reaches_its_target_in_the_saved_model(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl")
    compress = "{gradual: {sparsity: 0.6, start_step: 2, end_step: 10, every: 2}}"
    train(tmp_path, RECIPE.format(data=data, steps=12, compress=compress))
    report = json.loads((tmp_path / "run" / "gradual_pruning.json").read_text())
    assert [s["step"] for s in report["schedule"]] == [2, 4, 6, 8, 10]
    assert report["schedule"][-1]["target_sparsity"] == pytest.approx(0.6)
    for name, weight in final_weights(tmp_path / "run").items():
        assert float((weight == 0).float().mean()) == pytest.approx(0.6, abs=1 / weight.numel()), name


def test_lottery_ticket_prunes_each_round_and_keeps_its_mask(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl")
    compress = "{lottery: {rounds: 2, rate: 0.5, rewind_step: 1}}"
    train(tmp_path, RECIPE.format(data=data, steps=12, compress=compress))
    report = json.loads((tmp_path / "run" / "lottery_ticket.json").read_text())
    assert [(r["step"], r["round"]) for r in report["rounds"]] == [(4, 1), (8, 2)]
    assert report["measured_sparsity"] == pytest.approx(0.75, abs=1e-3)
    for weight in final_weights(tmp_path / "run").values():
        assert float((weight == 0).float().mean()) == pytest.approx(0.75, abs=1e-3)


def test_qat_run_saves_plain_weights_that_convert_to_what_it_trained(tmp_path, monkeypatch):
    from tunelab.compress.quantize import quantize
    from tunelab.models import load_run

    data = write_chat_data(tmp_path / "d.jsonl")
    ids = torch.randint(7, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    trained = record_final_logits(monkeypatch, ids)  # the fake-quantized model, before the run unwraps it
    train(tmp_path, RECIPE.format(data=data, steps=4, compress="{qat: {quantize: int4, group_size: 32}}"))
    report = json.loads((tmp_path / "run" / "qat.json").read_text())
    assert len(report["layers"]) == 14

    # Converted exactly as trained: fake quantization put back on the saved plain weights, then packed.
    model, _, _ = load_run(tmp_path / "run")
    assert all(type(layer) is torch.nn.Linear for layer in linear_layers(model).values())
    prepare_qat(model, QuantSpec("int4", 32))
    assert convert_qat(model) == report["layers"]
    assert all(isinstance(model.get_submodule(name), QuantLinear) for name in report["layers"])
    # ... and as qat.json says to: a `tunelab compress` variant `quantize: int4` (its step calls quantize).
    compressed, _ = quantize(load_run(tmp_path / "run")[0], "int4", group_size=32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, trained.logits)  # bit for bit
        assert torch.equal(compressed(input_ids=ids).logits, trained.logits)
