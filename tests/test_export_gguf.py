"""GGUF export: what transformers' (and llama.cpp's) GGUF readers load is the model tunelab trained."""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.train_helpers import train, write_chat_data
from tunelab.errors import UserError
from tunelab.export.gguf_file import base_gguf, export_gguf
from tunelab.export.gguf_tensors import interleave_rope_rows, q4_1_blocks
from tunelab.models import load_model

LORA_RUN = (
    "model: {{name: tiny-llama}}\ndata: {{train: {data}}}\n"
    "method: {{lora: {{r: 4, target_modules: all-linear}}}}\n"
    "train: {{lr: 0.02, batch_size: 8, precision: fp32, max_steps: 6}}\n"
)


def read_back(path):
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(7, 263, (2, 19), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("quant", "atol"), [("f32", 0.0), ("f16", 2e-3), ("q8_0", 2e-2)])
def test_exported_logits_equal_the_source_model(tmp_path, quant, atol):
    report = export_gguf("tiny-llama", tmp_path / "m.gguf", quant)
    source = load_model("tiny-llama").model.eval()
    got, want = logits(read_back(tmp_path / "m.gguf"), IDS), logits(source, IDS)
    assert (got - want).abs().max().item() <= atol
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert len(types) == 20 and sum(report["tensor_types"].values()) == 20  # 9 per block, embedding, final norm
    assert all(kind == "F32" for name, kind in types.items() if "norm" in name)


def test_q4_0_keeps_the_tied_embedding_at_q8_0_and_the_model_close(tmp_path):
    report = export_gguf("tiny-llama", tmp_path / "m.gguf", "q4_0")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.ffn_up.weight"] == "Q4_0"
    assert report["bytes"] == (tmp_path / "m.gguf").stat().st_size
    got, want = logits(read_back(tmp_path / "m.gguf"), IDS), logits(load_model("tiny-llama").model.eval(), IDS)
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.98


def test_tokenizer_and_chat_template_round_trip(tmp_path):
    export_gguf("tiny-llama", tmp_path / "m.gguf", "f32")
    ours = load_model("tiny-llama").tokenizer
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "Héllo <|im_start|>wörld\n\t 42 <|im_end|>"
    assert theirs(text).input_ids == ours(text).input_ids
    assert theirs.chat_template == ours.chat_template
    assert theirs.eos_token_id == ours.eos_token_id


def test_a_lora_run_exports_with_the_adapter_merged(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl")
    train(tmp_path, LORA_RUN.format(data=data))
    run = load_model(str(tmp_path / "run")).model.eval()
    base = load_model("tiny-llama").model.eval()
    export_gguf(str(tmp_path / "run"), tmp_path / "run.gguf", "f32")
    got = logits(read_back(tmp_path / "run.gguf"), IDS)
    assert torch.allclose(got, logits(run, IDS), atol=1e-4)
    assert not torch.allclose(got, logits(base, IDS), atol=1e-3)  # the adapter did change the model


def test_rope_rows_interleave_the_two_halves_of_each_head():
    order = interleave_rope_rows(8, heads=2)
    assert order.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_q4_1_blocks_decode_to_tunelabs_int4_values():
    from tunelab.compress.qlinear import QuantSpec, dequantize, quantize_weight

    weight = torch.randn(6, 96)
    codes, scale, zero = quantize_weight(weight, QuantSpec("int4", 32))
    blocks = q4_1_blocks(codes, scale, zero)
    decoded = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
    want = dequantize(codes, scale, zero).numpy()
    # d and m are stored as f16: the only change is their rounding
    assert np.abs(decoded - want).max() <= 2e-3 * np.abs(want).max()


def test_an_int4_group32_variant_is_written_as_q4_1_without_requantizing(tmp_path):
    from tunelab.compress.quantize import quantize
    from tunelab.compress.store import save_compressed

    loaded = load_model("tiny-llama")
    model, _ = quantize(loaded.model, "int4", group_size=32)
    save_compressed(model, loaded.tokenizer, tmp_path / "int4", {"source": "tiny-llama"})
    compressed = load_model(str(tmp_path / "int4")).model.eval()
    report = export_gguf(str(tmp_path / "int4"), tmp_path / "int4.gguf", "f32")
    assert report["tensor_types"]["Q4_1"] == 14  # 7 linears x 2 blocks; the embedding stays f32
    got, want = logits(read_back(tmp_path / "int4.gguf"), IDS), logits(compressed, IDS)
    assert (got - want).abs().max().item() < 5e-3


def test_non_llama_models_are_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="Llama-family causal LMs; this model is a BloomForCausalLM"):
        export_gguf("tiny-bloom", tmp_path / "b.gguf")
    assert not (tmp_path / "b.gguf").exists()


def test_cli_writes_the_file_and_says_how_to_run_it(tmp_path):
    from tunelab.cli import cli

    result = CliRunner().invoke(cli, ["export", "tiny-llama", "--gguf", str(tmp_path / "t.gguf"), "--quant", "q8_0"])
    assert result.exit_code == 0, result.output
    assert "GGUF written to" in result.output and "Q8_0 x15" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["t.gguf"]  # no partial file left behind
    nothing = CliRunner().invoke(cli, ["export", "tiny-llama"])
    assert nothing.exit_code != 0 and "--gguf OUT.gguf" in nothing.output


@pytest.mark.slow
def test_smollm2_export_keeps_the_tokenizer_and_greedy_output(tmp_path, monkeypatch):
    out = tmp_path / "smollm2-f16.gguf"
    report = export_gguf("smollm2-135m", out, "f16")
    assert report["pre_tokenizer"].startswith("smollm")
    original, exported = gguf.GGUFReader(base_gguf("smollm2-135m")), gguf.GGUFReader(out)
    for key, field in original.fields.items():
        if key.startswith("tokenizer.") and key != "tokenizer.ggml.add_space_prefix":
            assert exported.fields[key].contents() == field.contents(), key
    source = load_model("smollm2-135m")
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))  # the read-back conversion stays out of the user's cache
    back = load_model(str(out))
    prompts = ["What is the capital of France?", "Write a haiku about rain.", "List three prime numbers."]
    for prompt in prompts:
        ids = source.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            want = source.model.generate(ids, max_new_tokens=24, do_sample=False)
            got = back.model.generate(ids, max_new_tokens=24, do_sample=False)
        assert got.tolist() == want.tolist(), prompt


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_the_export(tmp_path):
    from llama_cpp import Llama

    out = tmp_path / "smollm2-f16.gguf"
    export_gguf("smollm2-135m", out, "f16")
    source = load_model("smollm2-135m")
    llm = Llama(model_path=str(out), n_ctx=256, n_threads=2, verbose=False)
    prompt = "The capital of France is"
    ids = source.tokenizer(prompt).input_ids
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    text = llm(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]
    with torch.no_grad():
        want = source.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    assert text == source.tokenizer.decode(want, skip_special_tokens=True)


def test_the_cli_offers_every_gguf_type_the_writer_knows():
    from tunelab.commands.train import export_command
    from tunelab.export.gguf_tensors import QUANTS

    quant = next(p for p in export_command.params if p.name == "quant")
    assert list(quant.type.choices) == list(QUANTS)
