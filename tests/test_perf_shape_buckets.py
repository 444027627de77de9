"""Packed rows padded to a multiple of 16 or 64 tokens so CPU bf16 kernels see repeating shapes: the
padding is no example and changes no loss, gradient or count."""

import pytest
import torch

from tests.test_perf_shared_prefix import chat_like, loss_and_grads
from tests.test_perf_varlen import lora_model
from tunelab.data import batch_tokens, collate_packed, pad_packed_row
from tunelab.data.collate import PADDING_SEGMENT, example_index
from tunelab.hardware import PrecisionChoice
from tunelab.train.objectives.causal_lm import CausalLMObjective
from tunelab.train.shape_buckets import ROW_MULTIPLE, SHORT_ROW_MULTIPLE, SHORT_ROW_TOKENS, pads_rows, row_multiple


@pytest.mark.parametrize("share_prefix", [False, True])
def test_a_padded_row_holds_the_same_examples(share_prefix):
    examples = chat_like([9, 30, 4, 17], weights=[1.0, 2.0, 0.5, 1.0])
    row = collate_packed(examples, share_prefix=share_prefix)
    padded = pad_packed_row(row, 64)
    length = row["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] == 64 * -(-length // 64) > length
    assert padded["segment_prefix"][-1].item() == PADDING_SEGMENT
    assert padded["segment_bounds"][-1].item() == padded["input_ids"].shape[1]
    assert batch_tokens(padded) == batch_tokens(row) == sum(len(e.input_ids) for e in examples)
    index = example_index(padded)
    assert torch.equal(index[:, :length], example_index(row))
    assert (index[:, length:] == -1).all() and int(index.max()) == len(examples) - 1
    assert (padded["labels"][:, length:] == -100).all() and (padded["weights"][:, length:] == 0).all()
    assert pad_packed_row(padded, 64) is padded  # already a multiple: unchanged


@pytest.mark.parametrize("share_prefix", [False, True])
def test_padding_changes_no_loss_or_gradient(share_prefix):
    model = lora_model()
    objective = CausalLMObjective(model, shared_prefix=share_prefix)
    assert objective.row_padding
    row = collate_packed(chat_like([9, 30, 4, 17], weights=[1.0, 2.0, 0.5, 1.0]), share_prefix=share_prefix)
    loss, stats, grads = loss_and_grads(objective, model, row)
    padded_loss, padded_stats, padded_grads = loss_and_grads(objective, model, pad_packed_row(row, 64))
    assert padded_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert padded_stats["tokens"] == stats["tokens"] and objective.units(pad_packed_row(row, 64)) == objective.units(row)
    assert all(torch.allclose(padded_grads[n], g, atol=1e-6) for n, g in grads.items())


def test_rows_are_padded_only_where_kernels_are_built_per_shape():
    cpu, bf16, fp32 = torch.device("cpu"), PrecisionChoice("bf16", "test"), PrecisionChoice("fp32", "test")
    assert pads_rows(bf16, cpu)
    assert not pads_rows(fp32, cpu)
    assert not pads_rows(bf16, torch.device("cuda"))


def test_short_rows_take_the_coarser_multiple():
    assert row_multiple(SHORT_ROW_TOKENS - 1) == SHORT_ROW_MULTIPLE > ROW_MULTIPLE == row_multiple(SHORT_ROW_TOKENS)
    assert SHORT_ROW_TOKENS % SHORT_ROW_MULTIPLE == 0  # a padded short row is at most SHORT_ROW_TOKENS long


def test_a_bf16_run_trains_on_padded_rows_and_counts_only_example_tokens(tmp_path, monkeypatch):
    from tests.train_helpers import train, write_chat_data
    from tunelab.train import loop

    lengths: list[int] = []

    def recording(batch, multiple):
        padded = pad_packed_row(batch, multiple)
        lengths.append(padded["input_ids"].shape[1])
        return padded

    monkeypatch.setattr(loop, "pad_packed_row", recording)
    data = write_chat_data(tmp_path / "d.jsonl", n=48)
    recipe = (f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\nmethod: {{lora: {{r: 4, dropout: 0.0}}}}\n"
              "train: {epochs: 1, batch_size: 8, precision: bf16}\n")
    padded = train(tmp_path, recipe)
    assert lengths and all(n % (SHORT_ROW_MULTIPLE if n <= SHORT_ROW_TOKENS else ROW_MULTIPLE) == 0 for n in lengths)
    monkeypatch.setattr(loop.shape_buckets, "pads_rows", lambda precision, device: False)
    plain = train(tmp_path, recipe, f"output_dir={tmp_path / 'plain'}")
    assert padded.tokens_seen == plain.tokens_seen > 0
    assert padded.final_train_loss == pytest.approx(plain.final_train_loss, rel=2e-2)
