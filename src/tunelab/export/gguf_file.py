"""``tunelab export RUN --gguf OUT.gguf``: one file llama.cpp runs, with the run's adapters merged.

Covers the Llama architecture (SmolLM2, Llama 2/3-style checkpoints with default or linear RoPE)
and byte-level BPE tokenizers. The model is loaded the way every tunelab command loads it (a run
directory, a compressed variant, a Hugging Face directory or an alias), its methods are folded
into the base weights, and the file is written next to ``OUT`` and renamed into place, so an
interrupted export never leaves a truncated ``OUT``.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import gguf

from tunelab.compress.store import MANIFEST as COMPRESSION_MANIFEST
from tunelab.errors import UserError
from tunelab.export.gguf_tensors import QUANTS, llama_tensors
from tunelab.export.gguf_vocab import vocab_from_tokenizer
from tunelab.methods.artifacts import merge_methods
from tunelab.models import load_model
from tunelab.rundir import is_run_dir, read_manifest

PER_BLOCK = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def export_gguf(source: str, out: Path, quant: str = "f16") -> dict[str, Any]:
    """Write ``source``'s model to ``out`` as GGUF at ``quant`` (a key of ``QUANTS``); returns a report."""
    if quant not in QUANTS:
        raise UserError(f"unknown GGUF type {quant!r}", hint="choose one of " + ", ".join(QUANTS))
    start = time.perf_counter()
    loaded = load_model(source)
    model = merge_methods(loaded.model).eval()
    _check_llama(model, source)
    base = base_gguf(source)
    vocab = vocab_from_tokenizer(loaded.tokenizer, model.config.vocab_size, base)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        types = _write(partial, model, vocab, quant, Path(source).name or source)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return {
        "path": str(out), "bytes": out.stat().st_size, "quant": quant, "tensor_types": dict(types),
        "pre_tokenizer": f"{vocab.pre} ({vocab.pre_source})", "seconds": round(time.perf_counter() - start, 1),
    }


def _write(path: Path, model: Any, vocab: Any, quant: str, name: str) -> Counter[str]:
    writer = gguf.GGUFWriter(path, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _write_hyperparameters(writer, model.config, name, quant)
    vocab.write(writer)
    types: Counter[str] = Counter()
    written = set()
    for tensor in llama_tensors(model, quant):
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.qtype)
        types[tensor.qtype.name] += 1
        written.add(tensor.name)
    _check_complete(written, model.config)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def _write_hyperparameters(writer: gguf.GGUFWriter, config: Any, name: str, quant: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if rope.get("rope_type", "default") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(QUANTS[quant][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _check_llama(model: Any, source: str) -> None:
    config = getattr(model, "config", None)
    if type(model).__name__ != "LlamaForCausalLM":
        raise UserError(
            f"GGUF export covers Llama-family causal LMs; this model is a {type(model).__name__}",
            where=source, hint="export a Hugging Face directory with --merge instead",
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise UserError(f"GGUF export: RoPE type {rope['rope_type']!r} is not written yet (default and linear are)", where=source)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"GGUF export: llama.cpp's Llama block uses SiLU, this model uses {config.hidden_act}", where=source)


def _check_complete(written: set[str], config: Any) -> None:
    expected = {"token_embd.weight", "output_norm.weight"}
    expected |= {f"blk.{i}.{part}.weight" for i in range(config.num_hidden_layers) for part in PER_BLOCK}
    if not config.tie_word_embeddings:
        expected.add("output.weight")
    missing = sorted(expected - written)
    if missing:
        raise UserError(f"GGUF export: no weights found for {', '.join(missing[:3])}", hint="layers compressed with torch.ao's per-tensor int8 cannot be exported; export the uncompressed run")


def base_gguf(source: str) -> Path | None:
    """The GGUF file ``source`` descends from, if any: a .gguf path, a packaged GGUF alias, the
    cache directory converted from one, or a run / compressed variant whose base is one of these."""
    from tunelab.models.registry import PACKAGED

    if source in PACKAGED:
        location = PACKAGED[source].location()
        return location if location is not None and location.suffix == ".gguf" else None
    path = Path(source)
    if path.suffix == ".gguf":
        return path if path.is_file() else None
    if is_run_dir(path):
        return _parent_gguf(read_manifest(path).get("base"), source)
    if (path / COMPRESSION_MANIFEST).is_file():
        return _parent_gguf(json.loads((path / COMPRESSION_MANIFEST).read_text()).get("source"), source)
    converted_from = path / ".complete"
    if converted_from.is_file():
        return base_gguf(converted_from.read_text().strip())
    return None


def _parent_gguf(parent: str | None, source: str) -> Path | None:
    return base_gguf(parent) if parent and parent != source else None
