"""Dynamic int8 with per-token activation scales and SmoothQuant smoothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.compress_helpers import calibration_chunks
from tunelab.compress.config import CompressConfig, QuantizeStep
from tunelab.compress.int8_dynamic import DynamicInt8Linear, smoothing_scales
from tunelab.compress.quantize import quantize
from tunelab.compress.store import load_compressed, save_compressed
from tunelab.errors import UserError
from tunelab.models import load_model


def _linear(inputs: int = 96, outputs: int = 40) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(inputs, outputs)


def _outlier_activations(rows: int = 32, inputs: int = 96) -> torch.Tensor:
    """Activations like an LLM's: most channels O(1), two channels 100x larger in every token."""
    x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(1))
    x[:, [3, 50]] *= 100
    return x


def _relative_error(layer: nn.Module, reference: nn.Linear, x: torch.Tensor) -> float:
    with torch.no_grad():
        return ((layer(x) - reference(x)).norm() / reference(x).norm()).item()


def test_output_is_close_to_the_float_layer():
    linear = _linear()
    x = torch.randn(3, 5, 96)
    assert _relative_error(DynamicInt8Linear.from_linear(linear), linear, x) < 0.02


def test_each_token_is_quantized_on_its_own():
    """Per-token scales: a token's output does not depend on the other tokens of the batch."""
    layer = DynamicInt8Linear.from_linear(_linear())
    x = torch.randn(6, 96)
    x[2] *= 1000  # a loud token would flatten its neighbours under one per-tensor scale
    with torch.no_grad():
        together = layer(x)
        alone = torch.cat([layer(row[None]) for row in x])
    assert torch.equal(together, alone)


def test_smoothing_is_the_same_function_and_absorbs_activation_outliers():
    linear = _linear()
    x = _outlier_activations()
    scales = smoothing_scales(x.abs().amax(0), linear.weight, alpha=0.8)
    smoothed = DynamicInt8Linear.from_linear(linear, scales)
    # the stored weight is W·s rounded to its row's int8 step; undoing s leaves at most half a step / s per element
    bound = smoothed.weight_scale[:, None] * smoothed.input_multiplier / 2
    assert ((smoothed.dequantized_weight() - linear.weight).abs() <= bound + 1e-7).all()
    plain = DynamicInt8Linear.from_linear(linear)
    assert _relative_error(smoothed, linear, x) < 0.5 * _relative_error(plain, linear, x)


def test_a_channel_silent_in_calibration_is_not_amplified():
    linear = _linear()
    calibration_inputs = _outlier_activations()
    calibration_inputs[:, 7] = 0  # never active on the calibration text
    scales = smoothing_scales(calibration_inputs.abs().amax(0), linear.weight, alpha=0.8)
    assert scales[7] == 1
    later = _outlier_activations(rows=8)
    later[:, 7] = 1.0
    assert _relative_error(DynamicInt8Linear.from_linear(linear, scales), linear, later) < 0.05


def test_eight_bit_activations_only_with_avx512_vnni(monkeypatch):
    from tunelab.compress import int8_dynamic

    for flags, expected in [({"avx512_vnni", "avx2"}, (127, 128)), ({"avx_vnni", "avx2"}, (63, 64)), (set(), (63, 64))]:
        monkeypatch.setattr(int8_dynamic, "cpu_flags", lambda flags=flags: flags)
        assert int8_dynamic._activation_range() == expected


def test_state_dict_carries_plain_int8_and_reloads_to_identical_outputs():
    linear = _linear()
    layer = DynamicInt8Linear.from_linear(linear, smoothing_scales(torch.rand(96) + 0.5, linear.weight, 0.5))
    state = layer.state_dict()
    assert state["weight_int8"].dtype == torch.int8 and state["weight_int8"].shape == (40, 96)
    fresh = DynamicInt8Linear(96, 40, bias=True, smoothed=True)
    fresh.load_state_dict(state)
    x = torch.randn(4, 96)
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(RuntimeError, match="weight_int8"):
        DynamicInt8Linear(96, 40).load_state_dict({k: v for k, v in state.items() if k != "weight_int8"})


def test_smoothed_model_saves_as_safetensors_and_reloads(tmp_path):
    loaded = load_model("tiny-llama", seed=0)
    chunks = calibration_chunks(32, 2, loaded.tokenizer)
    ids = torch.randint(7, 200, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = loaded.model(input_ids=ids).logits
        model, report = quantize(loaded.model, "dynamic-int8", smooth=0.8, chunks=chunks)
        out = model(input_ids=ids).logits
    assert report["quantized_layers"] == 14
    assert all(m.input_multiplier is not None for m in model.modules() if isinstance(m, DynamicInt8Linear))
    save_compressed(model, loaded.tokenizer, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists() and not (tmp_path / "m" / "model.pt").exists()
    reloaded, _, manifest = load_compressed(tmp_path / "m")
    assert next(iter(manifest["layers"].values()))["smoothed"] is True
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, out)
    assert ((out - reference).norm() / reference.norm()).item() < 0.05


def test_torch_ao_per_tensor_reference_still_available(tmp_path):
    loaded = load_model("tiny-llama", seed=0)
    model, _ = quantize(loaded.model, "dynamic-int8", activations="per-tensor")
    assert not any(isinstance(m, DynamicInt8Linear) for m in model.modules())
    manifest = save_compressed(model, loaded.tokenizer, tmp_path / "m")
    assert {d["activations"] for d in manifest["layers"].values()} == {"per-tensor"}
    load_compressed(tmp_path / "m")


def test_smoothing_without_calibration_text_says_what_to_set():
    with pytest.raises(UserError, match="smoothing needs calibration text"):
        quantize(load_model("tiny-llama").model, "dynamic-int8", smooth=0.8)
    variants = [{"name": "q", "steps": [{"quantize": "dynamic-int8"}]}]
    with pytest.raises(ValueError, match="variant 'q': dynamic-int8 smoothing needs calibration text"):
        CompressConfig.model_validate({"variants": variants})  # caught when the recipe loads, before any training
    CompressConfig.model_validate({"variants": [{"name": "q", "steps": [{"quantize": "dynamic-int8", "smooth": 0}]}]})


def test_manifests_from_before_per_token_int8_still_load_as_torch_ao(tmp_path):
    import json

    loaded = load_model("tiny-llama", seed=0)
    model, _ = quantize(loaded.model, "dynamic-int8", activations="per-tensor")
    save_compressed(model, loaded.tokenizer, tmp_path / "m")
    manifest_path = tmp_path / "m" / "tunelab_compression.json"
    manifest = json.loads(manifest_path.read_text())
    for layer in manifest["layers"].values():
        del layer["activations"]  # what session-1 manifests look like
    manifest_path.write_text(json.dumps(manifest))
    reloaded, _, _ = load_compressed(tmp_path / "m")
    ids = torch.randint(7, 200, (1, 10))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"quantize": "int4", "smooth": 0.5}, "only apply to dynamic-int8"),
        ({"quantize": "int8", "activations": "per-token"}, "only apply to dynamic-int8"),
        ({"quantize": "dynamic-int8", "activations": "per-tensor", "smooth": 0.5}, "no smoothing"),
        ({"quantize": "dynamic-int8", "smooth": 1.5}, "less than or equal to 1"),
    ],
)
def test_recipe_rejects_options_that_do_not_apply(step, message):
    with pytest.raises(ValueError, match=message):
        QuantizeStep.model_validate(step)


def test_seven_bit_activations_for_cpus_without_vnni_stay_accurate(monkeypatch):
    """The reduced range used where fbgemm's 16-bit pair sums could saturate is still a faithful layer."""
    from tunelab.compress import int8_dynamic

    monkeypatch.setattr(int8_dynamic, "ACTIVATION_MAX", 63)
    monkeypatch.setattr(int8_dynamic, "ZERO_POINT", 64)
    linear = _linear()
    assert _relative_error(DynamicInt8Linear.from_linear(linear), linear, torch.randn(8, 96)) < 0.03
