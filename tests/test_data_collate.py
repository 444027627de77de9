"""Batching: packed batches compute exactly what separate examples do; padded batches for the rest."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.data import IGNORE_INDEX, Example, collate_packed, collate_padded
from tunelab.models import load_model

X = IGNORE_INDEX


def test_packed_layout_restarts_positions_and_masks_each_first_label():
    batch = collate_packed([Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [X, 9])])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[X, 6, 7, X, 9]]
    assert set(batch) == {"input_ids", "labels", "position_ids"}


def test_padded_token_labels_and_class_labels():
    tokens = collate_padded([Example([5, 6, 7], [X, 6, 7]), Example([8], [8])], pad_id=0)
    assert tokens["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert tokens["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert tokens["labels"].tolist() == [[X, 6, 7], [8, X, X]]
    classes = collate_padded([Example([5, 6], [], label=2), Example([7], [], label=0)], pad_id=3)
    assert classes["input_ids"].tolist() == [[5, 6], [7, 3]]
    assert classes["labels"].tolist() == [2, 0] and classes["labels"].dtype == torch.long


def test_collators_refuse_inputs_they_cannot_batch():
    with pytest.raises(ValueError):
        collate_packed([Example([5], [], label=1)])
    with pytest.raises(ValueError):
        collate_padded([Example([5], [], label=1), Example([6], [6])], pad_id=0)


@pytest.fixture(scope="module")
def tiny_llama():
    model = load_model("tiny-llama", dtype=torch.float32, seed=0).model.eval()
    assert model.config._attn_implementation in ("sdpa", "eager")
    return model


def summed_token_loss(model, input_ids, labels, **kwargs) -> torch.Tensor:
    """Sum of next-token cross-entropies, shifting labels as Hugging Face models do."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits
    return F.cross_entropy(logits[0, :-1].double(), labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")


def examples() -> list[Example]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for length, prompt in ((9, 4), (14, 6), (5, 0), (11, 3)):
        ids = torch.randint(7, 263, (length,), generator=gen).tolist()
        out.append(Example(ids, [X] * prompt + ids[prompt:]))
    return out


def test_packed_loss_equals_sum_of_separate_losses(tiny_llama):
    batch = collate_packed(examples())
    packed = summed_token_loss(tiny_llama, batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
    separate = sum(
        summed_token_loss(tiny_llama, torch.tensor([e.input_ids]), torch.tensor([e.labels])) for e in examples()
    )
    assert packed.item() == pytest.approx(separate.item(), rel=1e-4)


def test_packed_examples_do_not_attend_to_each_other(tiny_llama):
    first, second = examples()[:2]
    changed = Example([t + 1 for t in first.input_ids], first.labels)
    logits = []
    for head in (first, changed):
        batch = collate_packed([head, second])
        with torch.no_grad():
            out = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        logits.append(out[0, len(head.input_ids) :])
    assert not torch.equal(collate_packed([first])["input_ids"], collate_packed([changed])["input_ids"])
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-6)
