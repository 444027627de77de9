"""The weight half of a GGUF file for the Llama family: names, layouts and GGML types.

Three things differ from a Hugging Face checkpoint:
- names: ``model.layers.3.self_attn.q_proj.weight`` is ``blk.3.attn_q.weight`` (the ``gguf``
  library's own name map does the translation);
- rotary layout: Hugging Face rotates the two halves of each head (``rotate_half``), llama.cpp
  rotates adjacent pairs, so the rows of q and k are interleaved per head (the inverse of what
  transformers' GGUF loader undoes);
- types: 1-D tensors (norms, biases) stay F32; matrices are F32, F16 or block-quantized (Q8_0;
  Q4_1 or Q4_0 with the embedding at Q8_0, as llama.cpp's own files do, because with tied weights
  it is also the output layer). A matrix whose rows are not a multiple of the 32-value block falls
  back to F16.
A layer that tunelab already quantized to ``int4`` with groups of 32 is written as Q4_1 without
requantizing: tunelab's ``(code - zero) · scale`` is Q4_1's ``code · d + m`` with ``d = scale``
and ``m = -zero · scale``, so only the rounding of d and m to f16 changes anything. Other
compressed layers are dequantized and written at the requested type.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from tunelab.compress import bitpack
from tunelab.compress.qlinear import QuantLinear
from tunelab.errors import UserError

QUANTS: dict[str, tuple[gguf.LlamaFileType, T]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, T.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, T.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
    "q4_1": (gguf.LlamaFileType.MOSTLY_Q4_1, T.Q4_1),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, T.Q4_0),
}
BLOCK = 32
EMBEDDING_NAMES = ("token_embd.weight", "output.weight")


@dataclass(frozen=True)
class GgufTensor:
    """One tensor ready for ``GGUFWriter.add_tensor``: numpy data (bytes for block types) and its type."""

    name: str
    data: np.ndarray
    qtype: T


def llama_tensors(model: torch.nn.Module, quant: str) -> Iterator[GgufTensor]:
    """Every tensor of a Llama-family causal LM under its GGUF name, in ``quant``'s types."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    quantized = {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    for hf_name, tensor in _float_tensors(model, quantized):
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export: no llama.cpp name for tensor {hf_name}", hint="only the Llama architecture's tensors can be exported")
        rows = _rope_rows(name, tensor.shape[0], heads, kv_heads)
        if rows is not None:
            tensor = tensor[rows]
        yield _encode(name, tensor.float().numpy(), quant)
    for module_name, layer in quantized.items():
        name = names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
        if name is None:
            raise UserError(f"GGUF export: no llama.cpp name for layer {module_name}")
        yield _q4_1_or_dequantized(name, layer, _rope_rows(name, layer.out_features, heads, kv_heads), quant)


def tensor_type(name: str, shape: tuple[int, ...], quant: str) -> T:
    """The GGML type ``quant`` gives a tensor (see the module docstring)."""
    wanted = QUANTS[quant][1]
    if len(shape) == 1:
        return T.F32
    if wanted in (T.F32, T.F16):
        return wanted
    if shape[-1] % BLOCK:
        return T.F16
    return T.Q8_0 if wanted in (T.Q4_0, T.Q4_1) and name in EMBEDDING_NAMES else wanted


def interleave_rope_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order taking a q/k projection from Hugging Face's half-split rotary layout to llama.cpp's
    interleaved pairs: within each head, rows ``0, d/2, 1, d/2+1, ...``."""
    head_dim = rows // heads
    return torch.arange(rows).view(heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def _rope_rows(name: str, rows: int, heads: int, kv_heads: int) -> torch.Tensor | None:
    if ".attn_q." in name:
        return interleave_rope_rows(rows, heads)
    if ".attn_k." in name:
        return interleave_rope_rows(rows, kv_heads)
    return None


def _float_tensors(model: torch.nn.Module, quantized: dict[str, QuantLinear]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every parameter (biases of ``quantized`` layers included) and, for
    other compressed layers (dynamic int8), their dequantized weight."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        dequantize = getattr(module, "dequantized_weight", None)
        if dequantize is not None and module_name not in quantized:
            yield f"{prefix}weight", dequantize().detach()
        for name, param in module.named_parameters(recurse=False):
            yield f"{prefix}{name}", param.detach()


def _encode(name: str, array: np.ndarray, quant: str) -> GgufTensor:
    qtype = tensor_type(name, array.shape, quant)
    if qtype == T.F32:
        return GgufTensor(name, np.ascontiguousarray(array, dtype=np.float32), qtype)
    if qtype == T.F16:
        return GgufTensor(name, array.astype(np.float16), qtype)
    return GgufTensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), qtype)


def _q4_1_or_dequantized(name: str, layer: QuantLinear, rows: torch.Tensor | None, quant: str) -> GgufTensor:
    spec = layer.spec
    if spec.format != "int4" or spec.group_size != BLOCK:
        weight = layer.dequantized_weight()
        return _encode(name, (weight if rows is None else weight[rows]).numpy(), quant)
    codes = bitpack.unpack(layer.codes, spec.code_bits, layer.in_features)
    scale, zero = layer.scale, layer.zero
    if rows is not None:
        codes, scale, zero = codes[rows], scale[rows], zero[rows]
    return GgufTensor(name, q4_1_blocks(codes, scale, zero), T.Q4_1)


def q4_1_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> np.ndarray:
    """GGML Q4_1 bytes ``[out, in/32 · 20]`` for 4-bit codes ``[out, in]`` with one scale and
    zero point per 32 inputs: each block is d (f16), m (f16), then 16 bytes holding code ``j`` in
    the low nibble and code ``j + 16`` in the high nibble."""
    out, width = codes.shape
    blocks = codes.numpy().astype(np.uint8).reshape(out, width // BLOCK, 2, BLOCK // 2)
    nibbles = blocks[:, :, 0, :] | (blocks[:, :, 1, :] << np.uint8(4))
    d = scale.numpy().astype(np.float16).view(np.uint8).reshape(out, -1, 2)
    m = (-zero.float() * scale).numpy().astype(np.float16).view(np.uint8).reshape(out, -1, 2)
    return np.concatenate([d, m, nibbles], axis=-1).reshape(out, -1)
