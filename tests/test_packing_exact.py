"""Packed rows only where the architecture computes them exactly; padded batches elsewhere.

Packing relies on the model reading restarting ``position_ids`` as example boundaries. BLOOM's
forward drops them, and BERT attends both ways across the row unless transformers builds its
bidirectional mask from the positions (5.25 and later), so their packed examples would see each
other: causal-LM training measures that (``packs_exactly``) and pads where they do.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from tests.train_helpers import recipe_for, train, write_chat_data
from tunelab.data import IGNORE_INDEX, Example, collate_packed, collate_padded
from tunelab.models import load_model
from tunelab.train.objectives.causal_lm import CausalLMObjective
from tunelab.train.packing_check import packs_exactly
from tunelab.train.prepare import prepare

PAD_ID = 3  # the tiny models' pad token
FALLBACK = "training on padded batches"


def examples() -> list[Example]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for length, prompt in ((9, 4), (14, 6), (5, 0), (11, 3)):
        ids = torch.randint(7, 263, (length,), generator=gen).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def logits_per_example(model: torch.nn.Module, batch: dict[str, torch.Tensor], lengths: list[int]) -> list[torch.Tensor]:
    """Each example's logits from one forward of ``batch`` (a packed row or padded rows)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    if "position_ids" in batch:
        return list(logits[0].split(lengths))
    return [row[:n] for row, n in zip(logits, lengths)]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bloom", "tiny-bert"])
def test_training_batches_compute_what_separate_examples_do(name):
    model = load_model(name).model.eval()
    objective = CausalLMObjective(model)
    collate = collate_packed if objective.collation == "packed" else (lambda ex: collate_padded(ex, PAD_ID))
    lengths = [len(e.input_ids) for e in examples()]
    batched = logits_per_example(model, collate(examples()), lengths)
    for example, logits in zip(examples(), batched):
        alone = logits_per_example(model, collate_padded([example], PAD_ID), [len(example.input_ids)])[0]
        torch.testing.assert_close(logits, alone, rtol=0, atol=1e-5)


def test_the_probe_tells_exact_architectures_from_leaking_ones():
    llama, bloom, bert = (load_model(name).model for name in ("tiny-llama", "tiny-bloom", "tiny-bert"))
    assert packs_exactly(llama, varlen=True) and packs_exactly(llama, varlen=False)
    assert not packs_exactly(bloom, varlen=False)  # its forward drops position_ids
    # bidirectional: BERT's packed row is exact only where transformers builds its bidirectional
    # mask from restarting positions (5.25 and later); before, it attends across the whole row
    assert packs_exactly(bert, varlen=False) == bidirectional_masks_read_positions()
    assert not packs_exactly(bert, varlen=True)  # per-example *causal* attention is not BERT's either


def bidirectional_masks_read_positions() -> bool:
    from transformers import masking_utils

    return "position_ids" in inspect.signature(masking_utils.create_bidirectional_mask).parameters


def test_the_probe_leaves_modes_and_gradients_as_they_were():
    model = load_model("tiny-llama").model.train()
    model.model.layers[0].eval()  # a frozen block a method put in eval mode stays so
    before = {name: module.training for name, module in model.named_modules()}
    assert packs_exactly(model, varlen=True)
    assert {name: module.training for name, module in model.named_modules()} == before
    assert all(p.grad is None for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"


def test_objective_on_padded_bloom_batches_equals_the_sum_over_examples():
    model = load_model("tiny-bloom").model.eval()
    objective = CausalLMObjective(model)
    assert objective.collation == "padded" and not objective.varlen
    with torch.no_grad():
        batched, stats = objective(model, collate_padded(examples(), PAD_ID))
        alone = sum(objective(model, collate_padded([e], PAD_ID))[0] for e in examples())
    assert stats["tokens"] == sum(sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples())
    assert batched.item() == pytest.approx(alone.item(), rel=1e-6)


def run_recipe(data, name: str) -> str:
    return (f"model: {{name: {name}}}\ndata: {{train: {data}}}\n"
            "train: {max_steps: 2, batch_size: 4, precision: fp32, threads: 1}\n")


def test_bloom_trains_on_padded_batches_and_says_so_once(tmp_path, capsys):
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    prepared = prepare(recipe_for(tmp_path, run_recipe(data, "tiny-bloom")))
    batch = prepared.collate(prepared.data.train[:4])
    assert "attention_mask" in batch and "position_ids" not in batch
    assert capsys.readouterr().out.count(FALLBACK) == 1

    summary = train(tmp_path, run_recipe(data, "tiny-bloom"))
    assert summary.steps == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if FALLBACK in line]
    assert len(lines) == 1 and "BloomForCausalLM" in lines[0]


def test_llama_still_trains_on_packed_rows(tmp_path, capsys):
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    prepared = prepare(recipe_for(tmp_path, run_recipe(data, "tiny-llama")))
    batch = prepared.collate(prepared.data.train[:4])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert prepared.objective.varlen
    assert FALLBACK not in capsys.readouterr().out
