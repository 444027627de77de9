"""Layers that skip the weights zero activations meet when decoding (why and how: ``compress.sparse_input``).

- ``SparseInputLinear``: any linear layer, inputs below a threshold treated as zero.
- ``SparseGatedMLP``: a ReLU-fied gated MLP (``method.activation``) as a whole: its gate decides,
  exactly, which intermediate channels are non-zero, so for one token it computes the gate densely
  and then only the active rows of ``up_proj`` and of ``down_projᵀ`` (no predictor needed). With a
  floored ReLU (``method.activation.floor``) a closed channel outputs its constant ``c``, which
  folds into one dense ``down·diag(c)·up`` [hidden × hidden] product beside the sparse part.

Their one-row products (decoding) are one call each into the fused kernels of
``compress.sparse_kernels``, or PyTorch's gather where those cannot be built.

Kept apart from the code that calibrates and installs them, so the compressed-model loader can
rebuild them without importing calibration or the method registry.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.compress.sparse_kernels import sparse_decode_kernels

WeightFormat = Literal["fp32", "int8"]

#: Without the fused kernel (no compiler): the fraction of active input features above which a
#: one-row fp32 product runs densely, because PyTorch's gather costs more per byte than streaming
#: the whole matrix (bench/activation_sparsity.py --kernels, "gather" columns: near half for
#: down_proj's 1536 short rows, higher for SmolLM2's gate/up and q/o). The fused kernel beats the
#: dense product at every density for gate/up and q/o, so it has no such switch.
DENSE_ABOVE = 0.5

#: "No floor" for the kernels' optional tensor arguments.
_NONE = torch.empty(0)


class SparseInputLinear(nn.Module):
    """A Linear whose inputs at or below ``threshold`` in magnitude count as zero (see ``compress.sparse_input``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weights: WeightFormat = "fp32"):
        super().__init__()
        self.in_features, self.out_features, self.weights = in_features, out_features, weights
        self.register_buffer("threshold", torch.zeros(()))
        if weights == "int8":  # [in, out + 8]: out codes, then a float scale and offset per row
            self.register_buffer("weight_rows", torch.zeros(in_features, out_features + 8, dtype=torch.uint8))
        else:
            self.register_buffer("weight_t", torch.zeros(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._offsets = torch.zeros(1, dtype=torch.long)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float, weights: WeightFormat = "fp32") -> SparseInputLinear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, weights=weights)
        transposed = linear.weight.detach().float().t().contiguous()
        if weights == "int8":
            layer.weight_rows = torch.ops.quantized.embedding_bag_byte_prepack(transposed)
        else:
            layer.weight_t = transposed
        layer.threshold = torch.tensor(float(threshold))
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().float().clone()
        return layer

    def transposed_weight(self) -> torch.Tensor:
        """``Wᵀ`` as floats ``[in, out]`` (int8 rows dequantized)."""
        if self.weights == "int8":
            return torch.ops.quantized.embedding_bag_byte_unpack(self.weight_rows)
        return self.weight_t

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight ``[out, in]`` this layer multiplies by."""
        return self.transposed_weight().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        if rows.shape[0] == 1:  # decoding: runs per layer per token
            out = self._decode_row(rows[0]).unsqueeze(0)
        else:  # prefill, scoring: dense, with exactly the zeros decoding skips
            out = (rows * (rows.abs() > self.threshold)) @ self.transposed_weight()
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _decode_row(self, row: torch.Tensor) -> torch.Tensor:
        """``row · W`` skipping inputs at or below the threshold: one fused kernel call, or, where it
        could not be built, PyTorch's gather (dense above ``DENSE_ABOVE``)."""
        kernels = sparse_decode_kernels()
        if kernels is not None:
            if self.weights == "int8":
                return kernels.sparse_input_u8(row, self.weight_rows, float(self.threshold))
            return kernels.sparse_input_f32(row, self.weight_t, float(self.threshold))
        kept = row.abs() > self.threshold
        active = kept.nonzero().squeeze(1)
        if self.weights == "fp32" and active.numel() > DENSE_ABOVE * self.in_features:
            return (row * kept) @ self.weight_t
        return self._gather_product(active, row.index_select(0, active))[0]

    def sparse_product(self, row: torch.Tensor) -> torch.Tensor:
        """``row · W`` (``[1, out]``) reading only the weight rows of ``row``'s non-zero features."""
        active = row.nonzero().squeeze(1)
        return self._gather_product(active, row.index_select(0, active))

    def _gather_product(self, active: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if self.weights == "int8":
            return torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                self.weight_rows, active, self._offsets, False, 0, False, values, None, False
            )
        return F.embedding_bag(active, self.weight_t, self._offsets, mode="sum", per_sample_weights=values)

    def describe(self) -> dict[str, Any]:
        """What a loader needs to rebuild this layer before loading its tensors."""
        return {"format": "sparse-input", "weights": self.weights, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weights}, threshold={float(self.threshold):.4g}"


#: Activations that are exactly zero wherever their input is not positive (what the gate path needs).
RELU_FAMILY = ("relu", "relu2")


class SparseGatedMLP(nn.Module):
    """``down(act(gate(x)) · up(x))`` for ``act`` in the ReLU family, computing for one token only the
    channels whose gate is positive: the gate densely, then those rows of ``up`` and ``downᵀ``.
    ``weights="int8"`` keeps all three in fbgemm's row-wise 8-bit format (a float scale and offset
    per channel's row), a quarter of the bytes each token reads.

    ``floored``: the activation is a floored ReLU, ``act(g)`` where ``g > 0`` and the channel's
    ``floor`` elsewhere. Decoding then weights an open channel by ``act(g) - floor`` and adds
    ``fold · x`` with ``fold = down·diag(floor)·up`` (in the weights' format, one row per output
    feature): the same function, with the closed channels' rows still never read."""

    #: The buffers of each weight format, all [intermediate, hidden(+8)]: a channel's row is contiguous.
    _BUFFERS = {"fp32": {"gate": "gate_weight", "up": "up_weight", "down_t": "down_weight_t"},
                "int8": {"gate": "gate_rows", "up": "up_rows", "down_t": "down_rows_t"}}
    #: The folded floor product of each weight format, [hidden, hidden(+8)].
    _FOLD = {"fp32": "fold_weight", "int8": "fold_rows"}

    def __init__(self, hidden: int, intermediate: int, act: str = "relu", weights: WeightFormat = "fp32", floored: bool = False):
        super().__init__()
        if act not in RELU_FAMILY:
            raise ValueError(f"SparseGatedMLP needs an activation that is zero for non-positive inputs, not {act!r}")
        self.hidden, self.intermediate, self.act, self.weights, self.floored = hidden, intermediate, act, weights, floored
        for buffer in self._BUFFERS[weights].values():
            self.register_buffer(buffer, self._rows(intermediate))
        if floored:
            self.register_buffer("floor", torch.zeros(intermediate))
            self.register_buffer(self._FOLD[weights], self._rows(hidden))
        self._offsets = torch.zeros(1, dtype=torch.long)

    def _rows(self, count: int) -> torch.Tensor:
        """Storage for ``count`` rows of ``hidden`` weights in this layer's format."""
        if self.weights == "int8":  # [count, hidden + 8]: codes, then a float scale and offset per row
            return torch.zeros(count, self.hidden + 8, dtype=torch.uint8)
        return torch.zeros(count, self.hidden)

    def _pack(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.detach().float().contiguous()
        return torch.ops.quantized.embedding_bag_byte_prepack(rows) if self.weights == "int8" else rows.clone()

    def _unpack(self, stored: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.embedding_bag_byte_unpack(stored) if self.weights == "int8" else stored

    @classmethod
    def from_mlp(cls, mlp: nn.Module, act: str, weights: WeightFormat = "fp32", floor: torch.Tensor | None = None) -> SparseGatedMLP:
        """The layer computing ``mlp``; ``floor``: the per-channel floors of its floored ReLU, if it has one."""
        layer = cls(mlp.gate_proj.in_features, mlp.gate_proj.out_features, act, weights, floored=floor is not None)
        rows = {"gate": mlp.gate_proj.weight, "up": mlp.up_proj.weight, "down_t": mlp.down_proj.weight.t()}
        for name, weight in rows.items():
            setattr(layer, cls._BUFFERS[weights][name], layer._pack(weight))
        if floor is not None:
            floor = floor.detach().float()
            layer.floor = floor.clone().contiguous()
            down, up = mlp.down_proj.weight.detach().float(), mlp.up_proj.weight.detach().float()
            setattr(layer, cls._FOLD[weights], layer._pack((down * floor) @ up))  # down·diag(floor)·up, from the float weights
        return layer

    def channel_rows(self, name: str) -> torch.Tensor:
        """``gate``, ``up`` or ``down_t`` as floats ``[intermediate, hidden]`` (int8 rows dequantized)."""
        return self._unpack(getattr(self, self._BUFFERS[self.weights][name]))

    def _activate(self, gate: torch.Tensor) -> torch.Tensor:
        gate = torch.relu(gate)
        return gate * gate if self.act == "relu2" else gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.hidden).float()
        if rows.shape[0] == 1:
            out = self._decode_row(rows[0]).unsqueeze(0)
        else:
            gate, up, down_t = (self.channel_rows(name) for name in ("gate", "up", "down_t"))
            gate = rows @ gate.t()
            active = torch.where(gate > 0, self._activate(gate), self.floor) if self.floored else self._activate(gate)
            out = (active * (rows @ up.t())) @ down_t
        return out.view(*x.shape[:-1], self.hidden).to(x.dtype)

    def _decode_row(self, row: torch.Tensor) -> torch.Tensor:
        """One token: the fused kernel, or PyTorch's gather where it could not be built."""
        kernels = sparse_decode_kernels()
        squared = self.act == "relu2"
        floor, fold = (self.floor, getattr(self, self._FOLD[self.weights])) if self.floored else (_NONE, _NONE)
        if kernels is not None and self.weights == "int8":
            return kernels.relu_gated_mlp_u8(row, self.gate_rows, self.up_rows, self.down_rows_t, squared, floor, fold)
        if kernels is not None:
            return kernels.relu_gated_mlp(row, self.gate_weight, self.up_weight, self.down_weight_t, squared, floor, fold)
        gate = self.channel_rows("gate") @ row
        active = (gate > 0).nonzero().squeeze(1)
        up = F.embedding(active, self.channel_rows("up")) @ row
        values = self._activate(gate.index_select(0, active))
        if self.floored:
            values = values - self.floor.index_select(0, active)
        values = values * up
        if self.weights == "int8":
            out = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                self.down_rows_t, active, self._offsets, False, 0, False, values, None, False
            )[0]
        else:
            out = F.embedding_bag(active, self.down_weight_t, self._offsets, mode="sum", per_sample_weights=values)[0]
        return out + self._unpack(fold) @ row if self.floored else out

    def linear_weights(self) -> list[torch.Tensor]:
        """The weights this layer multiplies by, as ``nn.Linear`` would hold them (for parameter
        counts): the three projections, and the folded floor product when floored."""
        weights = [self.channel_rows("gate"), self.channel_rows("up"), self.channel_rows("down_t").t()]
        return [*weights, self._unpack(getattr(self, self._FOLD[self.weights]))] if self.floored else weights

    def describe(self) -> dict[str, Any]:
        return {"format": "sparse-gated-mlp", "hidden": self.hidden, "intermediate": self.intermediate, "act": self.act,
                "weights": self.weights, "floored": self.floored}

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, intermediate={self.intermediate}, act={self.act}, weights={self.weights}, floored={self.floored}"
