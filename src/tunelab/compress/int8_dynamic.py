"""Dynamic int8 linear layers: int8 weights, activations quantized per token at run time.

Why not torch.ao's dynamic quantization: it gives a whole activation tensor one scale, so a
single outlier channel flattens every other value to a few levels. Measured on SmolLM2-135M over
80 held-out fortunes (``bench/int8_dynamic.py``): torch.ao +248% perplexity; symmetric int8 with
one scale per token +3.6%; per token after SmoothQuant smoothing (α = 0.8) +0.6%.

- Weights: symmetric int8, one scale per output channel, prepacked once for fbgemm's int8 GEMM.
- Activations: symmetric 8-bit (7-bit on CPUs without VNNI, see ``_activation_range``), one
  scale per token (row), computed on the fly. The kernel is handed the integer codes as floats
  with a unit scale (so its own quantization is exact) and the per-token scales multiply its fp32
  output, which is exact because each output row depends on one input row only. Batched and
  one-token-at-a-time calls give identical results.
- Smoothing (SmoothQuant, Xiao et al. 2023): per input channel ``s_j = max|X_j|^α / max|W_j|^(1-α)``
  from calibration text; the layer computes ``(X / s) · (W · s)ᵀ``, the same function, with the
  activation outliers moved into the weights where per-channel scales absorb them. ``1/s`` stays
  a per-layer input multiplier instead of being folded into the preceding norm, so it works for
  any architecture; the price is one elementwise multiply per layer.

Kernel choice (``bench/int8_dynamic.py --kernels``: SmolLM2, batch 1, 1 thread, interleaved;
prefill / decode speed-up over fp32, ``bench/results/int8_kernels.md``): fbgemm 1.31x / 1.21x;
oneDNN's ``qlinear_pointwise``, the other int8 GEMM in PyTorch's CPU build, 1.48x / 1.05x:
slower for the one-row products of decoding, where int8 matters most on CPU. The logits agree,
so the choice is speed only.

The state dict carries the plain int8 matrix (``weight_int8``), unpacked on save and packed again
on load, so RAM holds the packed copy only.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from tunelab.errors import UserError
from tunelab.hardware import cpu_flags


def _activation_range() -> tuple[int, int]:
    """(largest code, zero point) of the uint8 activations handed to fbgemm.

    Without AVX-512 VNNI fbgemm multiplies with ``vpmaddubsw``, whose 16-bit pair sums saturate
    above 32767; 7-bit activations (codes ±63 around 64) stay below it, which is why torch.ao's
    ``reduce_range`` exists. fbgemm has kernels for AVX2, AVX-512 and AVX-512 VNNI only, so the
    VEX-encoded AVX-VNNI of client CPUs does not count.
    """
    return (127, 128) if "avx512_vnni" in cpu_flags() else (63, 64)


INT8_MAX = 127
TINY = torch.finfo(torch.float32).tiny  # floor of every scale: an all-zero row or token stays zero
ACTIVATION_MAX, ZERO_POINT = _activation_range()


def smoothing_scales(activation_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel ``s = max|X|^α / max|W|^(1-α)``.

    A channel that stayed zero on the calibration text keeps ``s = 1``: its formula value would be
    tiny, and the first non-zero input it meets later would be multiplied by thousands and set
    the whole token's scale.
    """
    x = activation_absmax.float()
    w = weight.detach().float().abs().amax(0).clamp_min(1e-5)
    scales = (x.clamp_min(1e-5).pow(alpha) / w.pow(1 - alpha)).clamp_min(1e-5)
    return torch.where(x > 0, scales, torch.ones_like(scales))


def _packed_weight(weight_int8: torch.Tensor, scale: torch.Tensor) -> object:
    """fbgemm's prepacked form of an int8 ``[out, in]`` weight with per-row ``scale``."""
    if torch.backends.quantized.engine not in ("fbgemm", "x86"):
        raise UserError(f"dynamic-int8 needs PyTorch's fbgemm int8 kernels; the quantized engine is {torch.backends.quantized.engine!r}",
                        hint="on x86 set torch.backends.quantized.engine = 'x86'; elsewhere use the weight-only formats int8/int4")
    with warnings.catch_warnings():
        # torch 2.13 marks quantized-tensor creation as deprecated; this is still how fbgemm takes its weights.
        warnings.simplefilter("ignore", UserWarning)
        zero = torch.zeros(weight_int8.shape[0], dtype=torch.long)
        weight = torch._make_per_channel_quantized_tensor(weight_int8, scale.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(weight, None)


class DynamicInt8Linear(nn.Module):
    """A Linear with int8 weights and per-token dynamically quantized int8 activations (see module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, smoothed: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("input_multiplier", torch.ones(in_features) if smoothed else None)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed: object | None = None  # packed when the weights arrive (from_linear or load_state_dict)

    @classmethod
    def from_linear(cls, linear: nn.Linear, smoothing: torch.Tensor | None = None) -> DynamicInt8Linear:
        """Quantize ``linear``; ``smoothing`` (per input channel, see :func:`smoothing_scales`) is optional."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, smoothed=smoothing is not None)
        weight = linear.weight.detach().float()
        if smoothing is not None:
            weight = weight * smoothing
            layer.input_multiplier = (1 / smoothing).float()
        layer.weight_scale = weight.abs().amax(1).clamp_min(TINY) / INT8_MAX
        codes = torch.round(weight / layer.weight_scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        layer._packed = _packed_weight(codes, layer.weight_scale)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().float().clone()
        return layer

    def weight_int8(self) -> torch.Tensor:
        """The int8 weight ``[out, in]`` (unpacked on demand)."""
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer multiplies by, smoothing undone: ``W_int8 · scale / s``."""
        weight = self.weight_int8().float() * self.weight_scale[:, None]
        return weight if self.input_multiplier is None else weight * self.input_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            raise RuntimeError("DynamicInt8Linear has no weights yet: build it with from_linear or load a state dict")
        rows = x.reshape(-1, self.in_features).float()
        if self.input_multiplier is not None:
            rows = rows * self.input_multiplier
        scale = rows.abs().amax(-1, keepdim=True).clamp_min(TINY) / ACTIVATION_MAX
        codes = torch.round(rows / scale)
        out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes, 1.0, ZERO_POINT, self._packed)
        out.mul_(scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_int8"] = self.weight_int8()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        key, scale = prefix + "weight_int8", prefix + "weight_scale"
        if key in state_dict and scale in state_dict:
            self._packed = _packed_weight(state_dict.pop(key), state_dict[scale])
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def describe(self) -> dict:
        """What a loader needs to rebuild this layer before loading its tensors."""
        return {"format": "dynamic-int8", "activations": "per-token", "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "smoothed": self.input_multiplier is not None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, smoothed={self.input_multiplier is not None}"
