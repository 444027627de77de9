"""Activation sparsity: thresholded inputs, the sparse one-row product, and ReLU-fication."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.compress_helpers import calibration_chunks
from tests.train_helpers import record_final_logits, train, write_chat_data
from tunelab.compress import sparse_layers
from tunelab.compress.config import CompressConfig
from tunelab.compress.measure import count_parameters
from tunelab.compress.sparse_input import sparsify_activations, sparsify_gated_mlps
from tunelab.compress.sparse_kernels import sparse_decode_kernels
from tunelab.compress.sparse_layers import (
    DENSE_ABOVE,
    SparseGatedMLP,
    SparseInputLinear,
)
from tunelab.compress.store import load_compressed, save_compressed
from tunelab.errors import UserError
from tunelab.methods.activation import replace_mlp_activation
from tunelab.models import load_model

IDS = torch.randint(7, 200, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(params=["kernel", "pytorch"])
def decode_path(request, monkeypatch):
    """Every one-row test runs through the fused C++ kernel and through PyTorch's gather (its fallback)."""
    if request.param == "pytorch":
        monkeypatch.setattr(sparse_layers, "sparse_decode_kernels", lambda: None)
    else:
        assert sparse_decode_kernels() is not None, "the fused kernel builds wherever g++ and ninja exist (CI has both)"
    return request.param


def _sparse_row(features: int, density: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    row = torch.randn(1, features, generator=generator)
    return row * (torch.rand(1, features, generator=generator) < density)


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, DENSE_ABOVE + 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_the_sparse_product_equals_the_dense_one(density, bias, decode_path):
    linear = nn.Linear(96, 40, bias=bias)
    layer = SparseInputLinear.from_linear(linear, threshold=0.0)
    for seed in range(5):
        row = _sparse_row(96, density, seed)
        torch.testing.assert_close(layer(row), linear(row), rtol=1e-5, atol=1e-5)
    rows = torch.cat([_sparse_row(96, density, seed) for seed in range(4)])
    torch.testing.assert_close(layer(rows), linear(rows), rtol=1e-5, atol=1e-5)


def test_int8_rows_multiply_as_their_dequantized_weights(decode_path):
    linear = nn.Linear(96, 40)
    layer = SparseInputLinear.from_linear(linear, threshold=0.0, weights="int8")
    weight = layer.dequantized_weight()
    assert ((weight - linear.weight).abs().max() / linear.weight.abs().max()).item() < 0.01
    for seed in range(5):
        row = _sparse_row(96, 0.2, seed)
        torch.testing.assert_close(layer(row), row @ weight.t() + linear.bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weights", ["fp32", "int8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_splits_real_shapes_over_threads_and_equals_the_dense_product(weights, threads):
    """SmolLM2's shapes (576→1536, 1536→576), active counts that are not multiples of the kernel's
    four-row step, and output blocks split over threads."""
    kernels = sparse_decode_kernels()
    assert kernels is not None
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed, (fan_in, fan_out) in enumerate([(576, 1536), (1536, 576), (7, 3)]):
            linear = nn.Linear(fan_in, fan_out, bias=False)
            layer = SparseInputLinear.from_linear(linear, 0.0, weights)
            weight = layer.dequantized_weight()
            for density in (0.0, 0.33, 1.0):
                row = _sparse_row(fan_in, density, seed)
                torch.testing.assert_close(layer(row), row @ weight.t(), rtol=1e-4, atol=1e-4)
            mlp = SparseGatedMLP.from_mlp(_gated_mlp(fan_in, fan_out, seed), "relu", weights)
            gate, up, down_t = (mlp.channel_rows(name) for name in ("gate", "up", "down_t"))
            row = _sparse_row(fan_in, 1.0, seed)
            expected = (torch.relu(row @ gate.t()) * (row @ up.t())) @ down_t
            torch.testing.assert_close(mlp(row), expected, rtol=1e-4, atol=1e-5)
            _assert_floored_mlp_decodes_as_it_computes(_gated_mlp(fan_in, fan_out, seed), weights, row)
    finally:
        torch.set_num_threads(previous)


def _gated_mlp(hidden: int, intermediate: int, seed: int) -> nn.Module:
    """A Llama-style MLP's three projections (no biases), seeded."""
    torch.manual_seed(seed)
    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj = nn.Linear(hidden, intermediate, bias=False), nn.Linear(hidden, intermediate, bias=False)
    mlp.down_proj = nn.Linear(intermediate, hidden, bias=False)
    return mlp


def _assert_floored_mlp_decodes_as_it_computes(mlp: nn.Module, weights: str, row: torch.Tensor) -> None:
    """A floored ReLU MLP (closed channels output their floor) as a SparseGatedMLP: the one-row
    split form (open channels less their floors, plus the folded product) equals the floored MLP
    of the layer's own weights (int8: dequantized; the fold, quantized on its own, within rounding)."""
    floor = torch.randn(mlp.up_proj.out_features, generator=torch.Generator().manual_seed(7)) * 0.2
    layer = SparseGatedMLP.from_mlp(mlp, "relu", weights, floor=floor)
    gate_w, up_w, down_t = (layer.channel_rows(name) for name in ("gate", "up", "down_t"))
    gate = row @ gate_w.t()
    exact = (torch.where(gate > 0, gate, floor) * (row @ up_w.t())) @ down_t
    tolerance = 1e-6 if weights == "fp32" else 0.01
    assert ((layer(row) - exact).norm() / exact.norm()).item() < tolerance  # one row: the split form
    assert ((layer(torch.cat([row, row]))[:1] - exact).norm() / exact.norm()).item() < 1e-6  # several rows: the floored MLP itself


def test_int8_gated_mlp_rows_are_within_int8_rounding_of_the_weights(decode_path):
    mlp = _gated_mlp(64, 160, 0)
    layer = SparseGatedMLP.from_mlp(mlp, "relu", "int8")
    for name, weight in (("gate", mlp.gate_proj.weight), ("up", mlp.up_proj.weight), ("down_t", mlp.down_proj.weight.t())):
        assert ((layer.channel_rows(name) - weight).abs().max() / weight.abs().max()).item() < 0.01
    rows = torch.randn(3, 64)
    dense = mlp.down_proj(torch.relu(mlp.gate_proj(rows)) * mlp.up_proj(rows))
    for row, reference in zip(rows, layer(rows), strict=True):  # one row (decoding) = several rows (prefill), same weights
        torch.testing.assert_close(layer(row[None]), reference[None], rtol=1e-4, atol=1e-5)
    assert ((layer(rows) - dense).norm() / dense.norm()).item() < 0.02


def test_inputs_at_or_below_the_threshold_count_as_zero(decode_path):
    linear = nn.Linear(8, 4)
    layer = SparseInputLinear.from_linear(linear, threshold=0.5)
    x = torch.tensor([[0.4, -0.6, 0.5, -0.2, 1.0, 0.0, -0.5, 0.7]])
    kept = torch.tensor([[0.0, -0.6, 0.0, 0.0, 1.0, 0.0, 0.0, 0.7]])
    torch.testing.assert_close(layer(x), linear(kept))
    torch.testing.assert_close(layer(x.repeat(3, 1)), linear(kept.repeat(3, 1)))


def test_sparsity_zero_is_the_dense_model(decode_path):
    loaded = load_model("tiny-llama", seed=0)
    model = loaded.model.eval()
    with torch.no_grad():
        reference = model(input_ids=IDS).logits
        dense_tokens = model.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False)
    report = sparsify_activations(model, 0.0, chunks=calibration_chunks(32, 2, loaded.tokenizer))
    layers = [m for m in model.modules() if isinstance(m, SparseInputLinear)]
    assert report["sparsified_layers"] == len(layers) == 14 and all(float(m.threshold) == 0 for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, reference, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False), dense_tokens)


def test_thresholds_skip_the_stated_fraction_of_inputs_on_new_text():
    loaded = load_model("tiny-llama", seed=0)
    chunks = calibration_chunks(64, 8, loaded.tokenizer)
    report = sparsify_activations(loaded.model, 0.4, chunks=chunks[:4])
    assert abs(report["activation_sparsity"] - 0.4) < 0.005
    skipped = []

    def record(module, args):
        skipped.append(float((args[0].abs() <= module.threshold).float().mean()))

    for module in loaded.model.modules():
        if isinstance(module, SparseInputLinear):
            module.register_forward_pre_hook(record)
    with torch.no_grad():
        loaded.model(input_ids=chunks[4:])  # text the thresholds were not calibrated on
    assert abs(sum(skipped) / len(skipped) - 0.4) < 0.05


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_a_sparsified_model_saves_and_reloads_to_the_same_outputs(tmp_path, weights):
    loaded = load_model("tiny-llama", seed=0)
    total = count_parameters(loaded.model)[0]
    sparsify_activations(loaded.model, 0.5, weights=weights, chunks=calibration_chunks(32, 2, loaded.tokenizer))
    assert count_parameters(loaded.model)[0] == total
    manifest = save_compressed(loaded.model, loaded.tokenizer, tmp_path / "m")
    assert manifest["loader"] == "tunelab" and {d["format"] for d in manifest["layers"].values()} == {"sparse-input"}
    reloaded, _, _ = load_compressed(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, loaded.model(input_ids=IDS).logits)
        # fbgemm's row gather rounds the last bits by the rows' memory alignment (the reloaded
        # tensors sit in a safetensors buffer), so the one-row path agrees to float tolerance.
        torch.testing.assert_close(reloaded(input_ids=IDS[:1, :1]).logits, loaded.model(input_ids=IDS[:1, :1]).logits, rtol=1e-5, atol=1e-6)


def test_thresholds_need_calibration_text():
    with pytest.raises(ValueError, match="activation thresholds are calibrated on text"):
        CompressConfig(heldout="h.txt", variants=[{"name": "a", "steps": [{"sparsify": "activations", "sparsity": 0.5}]}])
    CompressConfig(heldout="h.txt", variants=[{"name": "a", "steps": [{"sparsify": "activations", "sparsity": 0}]}])
    with pytest.raises(UserError, match="calibrated on text"):
        sparsify_activations(load_model("tiny-llama", seed=0).model, 0.5)


def _down_proj_zeros(model: nn.Module, ids: torch.Tensor) -> float:
    zeros = []
    hooks = [m.down_proj.register_forward_pre_hook(lambda _m, args: zeros.append(float((args[0] == 0).float().mean())))
             for m in model.modules() if type(m).__name__.endswith("MLP")]
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return sum(zeros) / len(zeros)


def test_a_relufied_model_trains_reloads_with_relu_and_its_mlp_inputs_are_exact_zeros(tmp_path):
    from tunelab.models import load_run

    data = write_chat_data(tmp_path / "d.jsonl")
    summary = train(
        tmp_path,
        f"model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.15}}\n"
        "method: {activation: {mlp: relu}, lora: {r: 8, target_modules: all-linear}}\n"
        "train: {lr: 0.01, max_steps: 30, batch_size: 8, schedule: constant, precision: fp32}\n",
    )
    assert summary.eval_after["eval_loss"] < summary.eval_before["eval_loss"] - 0.3
    model, tokenizer, _ = load_run(tmp_path / "run")  # an adapter run: the base gets ReLU again on load
    assert model.config.hidden_act == "relu"
    assert all(isinstance(m.act_fn, nn.ReLU) for m in model.modules() if type(m).__name__.endswith("MLP"))
    zeros = _down_proj_zeros(model, IDS)
    assert zeros > 0.3 and _down_proj_zeros(load_model("tiny-llama", seed=0).model, IDS) == 0
    merged = model.merge_and_unload()
    report = sparsify_activations(merged, 0.0, targets=["down_proj"], chunks=IDS)
    assert report["activation_sparsity_by_kind"] == {"down_proj": pytest.approx(zeros, abs=1e-4)}


def test_an_architecture_without_a_gated_mlp_activation_is_refused(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl")
    with pytest.raises(UserError, match="no gated MLP activation"):
        train(tmp_path, f"model: {{name: tiny-bloom}}\ndata: {{train: {data}}}\nmethod: {{activation: {{mlp: relu}}}}\ntrain: {{max_steps: 1}}\n")


@pytest.mark.parametrize("act", ["relu", "relu2"])
def test_a_relufied_mlp_computing_only_open_channels_is_the_same_model(tmp_path, act, decode_path):
    loaded = load_model("tiny-llama", seed=0)
    model = replace_mlp_activation(loaded.model, act).eval()
    total = count_parameters(model)[0]
    with torch.no_grad():
        reference = model(input_ids=IDS).logits
        tokens = model.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False)
    report = sparsify_gated_mlps(model, calibration_chunks(32, 2, loaded.tokenizer))
    assert report["sparsified_mlps"] == 2 and 0.3 < report["activation_sparsity"] < 0.7
    assert sum(isinstance(m, SparseGatedMLP) for m in model.modules()) == 2 and count_parameters(model)[0] == total
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, reference, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False), tokens)  # one token at a time: the gather path
    save_compressed(model, loaded.tokenizer, tmp_path / "m")
    reloaded, _, manifest = load_compressed(tmp_path / "m")
    assert {d["format"] for d in manifest["layers"].values()} == {"sparse-gated-mlp"}
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_an_int8_relufied_mlp_model_decodes_as_it_scores_and_reloads(tmp_path, decode_path):
    loaded = load_model("tiny-llama", seed=0)
    model = replace_mlp_activation(loaded.model, "relu").eval()
    with torch.no_grad():
        reference = model(input_ids=IDS).logits
    report = sparsify_gated_mlps(model, calibration_chunks(32, 2, loaded.tokenizer), weights="int8")
    assert report["weights"] == "int8" and all(m.gate_rows.dtype == torch.uint8 for m in model.modules() if isinstance(m, SparseGatedMLP))
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        assert ((logits - reference).norm() / reference.norm()).item() < 0.01
        prompt = IDS[:1, :6]
        tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)  # one token at a time: the int8 kernel
        rescored = model(input_ids=tokens).logits[0, prompt.shape[1] - 1:-1].argmax(-1)  # all rows at once: the dense path
        assert torch.equal(rescored, tokens[0, prompt.shape[1]:])
    save_compressed(model, loaded.tokenizer, tmp_path / "m")
    reloaded, _, manifest = load_compressed(tmp_path / "m")
    assert {d["weights"] for d in manifest["layers"].values()} == {"int8"}
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, logits)


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_a_floored_relu_model_decodes_only_open_channels_as_the_floored_model_and_reloads(tmp_path, weights, decode_path):
    loaded = load_model("tiny-llama", seed=0)
    model = replace_mlp_activation(loaded.model, "relu", floor=True).eval()
    with torch.no_grad():
        model(input_ids=IDS)  # the first forward calibrates the floors
        reference = model(input_ids=IDS).logits
        tokens = model.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False)
    report = sparsify_gated_mlps(model, calibration_chunks(32, 2, loaded.tokenizer), weights=weights)
    layers = [m for m in model.modules() if isinstance(m, SparseGatedMLP)]
    assert report["floored"] and 0.3 < report["activation_sparsity"] < 0.7 and len(layers) == 2
    assert all(m.floored and (m.floor != 0).any() for m in layers)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        if weights == "fp32":
            torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
            assert torch.equal(model.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False), tokens)  # one token at a time
        else:
            assert ((logits - reference).norm() / reference.norm()).item() < 0.01
            decoded = model.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False)
            assert torch.equal(model(input_ids=decoded).logits[0, 5:-1].argmax(-1), decoded[0, 6:])  # decoding = scoring
    save_compressed(model, loaded.tokenizer, tmp_path / "m")
    reloaded, _, manifest = load_compressed(tmp_path / "m")
    assert all(d["floored"] for d in manifest["layers"].values())
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, logits)


def test_gated_mlp_sparsity_needs_a_relufied_model():
    with pytest.raises(UserError, match="MLP activation is silu"):
        sparsify_gated_mlps(load_model("tiny-llama", seed=0).model)
    with pytest.raises(ValueError, match="do not apply to sparsify: gated-mlp"):
        CompressConfig(heldout="h.txt", variants=[{"name": "a", "steps": [{"sparsify": "gated-mlp", "sparsity": 0.5}]}])
    CompressConfig(heldout="h.txt", variants=[{"name": "a", "steps": [{"sparsify": "gated-mlp", "weights": "int8"}]}])


def test_annealing_starts_at_the_silu_model_and_ends_at_exact_relu(tmp_path, monkeypatch):
    from tunelab.methods.activation import AnnealedReLU
    from tunelab.models import load_run
    from tunelab.train.relu_annealing import ReLUAnnealing

    x = torch.linspace(-6, 6, 97)
    torch.testing.assert_close(AnnealedReLU(1.0)(x), nn.functional.silu(x), rtol=0, atol=1e-6)
    assert torch.equal(AnnealedReLU(float("inf"))(x), torch.relu(x))
    assert (AnnealedReLU(64.0)(x) - torch.relu(x)).abs().max() < 0.005
    betas = [ReLUAnnealing(0.5, 64.0).beta(step, 20) for step in range(20)]
    assert betas[0] == 1.0 and all(a < b for a, b in zip(betas[:9], betas[1:10], strict=True)) and betas[9] < 64.0
    assert betas[10:] == [float("inf")] * 10
    assert ReLUAnnealing(1.0, 64.0).beta(19, 20) == float("inf") > ReLUAnnealing(1.0, 64.0).beta(18, 20)  # the last step is exact ReLU

    seen: list[float] = []
    step_start = ReLUAnnealing.on_step_start

    def record_beta(self, state, batches):
        step_start(self, state, batches)
        seen.append(next(m.beta for m in state.model.modules() if isinstance(m, AnnealedReLU)))

    monkeypatch.setattr(ReLUAnnealing, "on_step_start", record_beta)
    data = write_chat_data(tmp_path / "d.jsonl")

    def run(name: str, activation: str, steps: int):
        (tmp_path / name).mkdir()
        return train(tmp_path / name, f"model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.15}}\n"
                     f"method: {{activation: {activation}}}\n"
                     f"train: {{lr: 0.001, max_steps: {steps}, batch_size: 8, schedule: constant, precision: fp32}}\n")

    final = record_final_logits(monkeypatch, IDS)
    annealed = run("annealed", "{mlp: relu, anneal: 0.5}", 10)
    assert seen == [ReLUAnnealing(0.5, 64.0).beta(step, 10) for step in range(10)]
    model, _, _ = load_run(tmp_path / "annealed" / "run")
    assert model.config.hidden_act == "relu" and isinstance(model.model.layers[0].mlp.act_fn, nn.ReLU)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, final.logits, rtol=1e-5, atol=1e-5)  # it trained as ReLU at the end
    assert _down_proj_zeros(model, IDS) > 0.3
    swapped = run("swapped", "{mlp: relu}", 1)
    (tmp_path / "silu").mkdir()
    silu = train(tmp_path / "silu", f"model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.15}}\n"
                 "train: {max_steps: 1, batch_size: 8, precision: fp32}\n")
    assert annealed.eval_before["eval_loss"] == pytest.approx(silu.eval_before["eval_loss"], abs=1e-6)  # no jump at step 0
    assert abs(swapped.eval_before["eval_loss"] - silu.eval_before["eval_loss"]) > 1e-3  # a sudden swap jumps


def test_annealing_is_for_relu_from_silu_only(tmp_path):
    from tunelab.methods.activation import ActivationConfig

    with pytest.raises(ValueError, match="no path to relu2"):
        ActivationConfig(mlp="relu2", anneal=0.5)
    data = write_chat_data(tmp_path / "d.jsonl")
    (tmp_path / "relu").mkdir()
    train(tmp_path / "relu", f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\nmethod: {{activation: {{mlp: relu}}}}\n"
          "train: {max_steps: 1, batch_size: 8, precision: fp32}\n")
    with pytest.raises(UserError, match="anneal starts from SiLU"):  # a model that is ReLU already
        train(tmp_path, f"model: {{name: {tmp_path / 'relu' / 'run'}}}\ndata: {{train: {data}}}\n"
              "method: {activation: {mlp: relu, anneal: 0.5}}\ntrain: {max_steps: 1}\n")


def test_floors_start_at_the_silu_mean_of_closed_channels_and_split_into_exact_zeros_plus_one_product():
    from tunelab.methods.activation import FlooredReLU

    torch.manual_seed(0)
    gates = torch.randn(3, 7, 16) * 2
    gates[..., 5] = torch.rand(3, 7) + 0.1  # a channel that never closes: floor 0
    act = FlooredReLU(16)
    out = act(gates)
    flat = gates.reshape(-1, 16)
    for channel in range(16):
        closed = flat[:, channel] <= 0
        expected = nn.functional.silu(flat[closed, channel]).mean() if closed.any() else torch.tensor(0.0)
        assert act.floor[channel].item() == pytest.approx(expected.item(), abs=1e-6)
    assert act.floor[5] == 0 and torch.equal(out[gates > 0], gates[gates > 0])
    floors = act.floor.detach().clone()
    act(torch.randn(5, 16))  # calibrated once: later inputs leave the floors alone
    assert torch.equal(act.floor.detach(), floors)

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(1)
    mlp = LlamaMLP(LlamaConfig(hidden_size=12, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2, hidden_act="silu"))
    mlp.act_fn = act
    hidden = torch.randn(9, 12)
    gate, up = mlp.gate_proj(hidden), mlp.up_proj(hidden)
    open_part = torch.where(gate > 0, gate - floors, torch.zeros_like(gate)) * up  # exact zeros on closed channels
    folded = mlp.down_proj.weight @ torch.diag(floors) @ mlp.up_proj.weight  # [hidden, hidden]
    with torch.no_grad():
        torch.testing.assert_close(mlp(hidden), mlp.down_proj(open_part) + hidden @ folded.t(), rtol=1e-5, atol=1e-5)
    assert (open_part[gate <= 0] == 0).all()


@pytest.mark.parametrize("adapter", [False, True])
def test_a_floored_relu_swap_starts_nearer_the_silu_model_trains_and_reloads_with_its_floors(tmp_path, monkeypatch, adapter):
    from tunelab.methods.activation import FlooredReLU, floored_relus
    from tunelab.methods.artifacts import merge_methods
    from tunelab.models import load_run

    data = write_chat_data(tmp_path / "d.jsonl")
    lora = ", lora: {r: 8, target_modules: all-linear}" if adapter else ""

    def run(name: str, activation: str, steps: int):
        (tmp_path / name).mkdir()
        method = f"method: {{activation: {activation}{lora}}}\n" if activation else ""
        return train(tmp_path / name, f"model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.15}}\n{method}"
                     f"train: {{lr: 0.003, max_steps: {steps}, batch_size: 8, schedule: constant, precision: fp32}}\n")

    final = record_final_logits(monkeypatch, IDS)
    floored = run("floored", "{mlp: relu, floor: true}", 12)
    assert floored.eval_after["eval_loss"] < floored.eval_before["eval_loss"]
    model, _, manifest = load_run(tmp_path / "floored" / "run")
    acts = floored_relus(model)
    assert len(acts) == 2 and all(not torch.isnan(a.floor).any() and (a.floor < 0).any() for a in acts)
    assert model.config.hidden_act == "relu" and manifest["method"]["activation"]["floor"] is True
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, final.logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="floored ReLUs"):  # export and later stages need a plain model
        merge_methods(model)
    if not adapter:
        silu, swapped = run("silu", "", 1), run("swapped", "{mlp: relu}", 1)
        jump = abs(swapped.eval_before["eval_loss"] - silu.eval_before["eval_loss"])
        assert abs(floored.eval_before["eval_loss"] - silu.eval_before["eval_loss"]) < 0.7 * jump  # 0.57 measured (SmolLM2: far more)
    assert isinstance(acts[0], FlooredReLU)


def test_tunelab_compress_keeps_a_floored_runs_floors_and_decodes_them_sparsely(tmp_path):
    from click.testing import CliRunner

    from tunelab.cli import cli
    from tunelab.models import load_run

    data = write_chat_data(tmp_path / "d.jsonl")
    train(tmp_path, f"model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.0}}\nmethod: {{activation: {{mlp: relu, floor: true}}}}\n"
          "train: {lr: 0.003, max_steps: 6, batch_size: 8, precision: fp32, eval_before: false}\n")
    examples = Path(__file__).resolve().parent.parent / "examples" / "data" / "heldout"
    recipe = tmp_path / "compress.yaml"
    recipe.write_text(f"model: {{name: tiny-llama}}\ncompress:\n  heldout: {examples / 'fortunes.txt'}\n  heldout_texts: 4\n"
                      f"  calibration: {examples / 'calibration.txt'}\n  calibration_chunks: 2\n  max_length: 32\n  prefill_tokens: 16\n"
                      "  decode_tokens: 4\n  repeats: 1\n  keep_models: true\n  variants:\n"
                      "    - {name: int8, steps: [{quantize: dynamic-int8}]}\n    - {name: gated, steps: [{sparsify: gated-mlp}]}\n"
                      "    - {name: gated-int8, steps: [{sparsify: gated-mlp, weights: int8}]}\n")
    result = CliRunner().invoke(cli, ["compress", str(tmp_path / "run"), "--recipe", str(recipe), "--output", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    trained, _, _ = load_run(tmp_path / "run")
    with torch.no_grad():
        reference = trained(input_ids=IDS).logits
    formats = {}
    for variant in ("original", "int8", "gated", "gated-int8"):
        model, _, manifest = load_compressed(tmp_path / "c" / "compressed" / variant)
        formats[variant] = {d["format"] for d in manifest["layers"].values()}
        with torch.no_grad():
            logits = model(input_ids=IDS).logits
        limit = 1e-6 if variant in ("original", "gated") else 0.02
        assert ((logits - reference).norm() / reference.norm()).item() < limit, variant
    assert formats["original"] == {"floored-relu"} and "floored-relu" in formats["int8"] and formats["gated"] == {"sparse-gated-mlp"}
    rows = {row["variant"]: row for row in json.loads((tmp_path / "c" / "compress.json").read_text())["rows"]}
    assert rows["gated"]["steps"][0]["floored"] and 0.2 < rows["gated"]["steps"][0]["activation_sparsity"] < 0.8
    assert abs(rows["gated"]["perplexity"] / rows["original"]["perplexity"] - 1) < 1e-4
    closed = f"{100 * rows['gated']['steps'][0]['activation_sparsity']:.0f}% of MLP channels"
    assert f"| gated | {rows['gated']['params'] / 1e6:.1f}M | {closed} |" in (tmp_path / "c" / "compress.md").read_text()
    refused = CliRunner().invoke(cli, ["compress", str(tmp_path / "run"), "compress.variants=[{name: a, steps: [{prune: mlp, sparsity: 0.25}]}]",
                                       "--recipe", str(recipe), "--output", str(tmp_path / "c2")])
    assert refused.exit_code == 2 and "cannot keep the floors" in refused.output, refused.output


def test_floors_are_for_relu_swapped_at_once_from_silu():
    from tunelab.methods.activation import ActivationConfig

    for options in ({"mlp": "relu2", "floor": True}, {"mlp": "relu", "floor": True, "anneal": 0.3}):
        with pytest.raises(ValueError, match="floor is for mlp: relu"):
            ActivationConfig(**options)
