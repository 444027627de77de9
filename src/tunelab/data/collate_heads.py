"""Batches for heads and embeddings: right padding plus the tensors each shape needs.

``collate_head_batch`` adds to ``collate_padded``'s ``input_ids``/``attention_mask``/``labels``:

- ``weights`` ``[B]``: the per-example loss weights (``data.weight_column``; 1 by default);
- ``targets`` ``[B, K]``: float targets (regression values, multi-hot label sets);
- for grouped examples (contrastive pairs, multiple choice) every sequence of every example is
  one row: ``input_ids`` is ``[B * G, L]`` in example-major order and ``group_mask`` ``[B, G]``
  marks which of the G slots hold a sequence (a pair without a negative, a question with fewer
  choices than the longest one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tunelab.data.bundle import Example
from tunelab.data.collate import collate_padded


def collate_head_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of ``examples`` (all of one shape)."""
    if not examples:
        raise ValueError("collate_head_batch needs at least one example")
    if examples[0].group is not None:
        return _grouped(examples, pad_id)
    batch = collate_padded(examples, pad_id)
    if examples[0].label is None and not examples[0].labels:
        del batch["labels"]  # no class ids: regression/multi-label use targets, sentence shapes nothing
    if examples[0].targets is not None:
        batch["targets"] = torch.tensor([e.targets for e in examples], dtype=torch.float32)
    batch["weights"] = torch.tensor([e.weight for e in examples], dtype=torch.float32)
    return batch


def _grouped(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    size = max(len(e.group or []) for e in examples)
    rows: list[Example] = []
    mask = torch.zeros((len(examples), size), dtype=torch.bool)
    for i, example in enumerate(examples):
        slots = list(example.group or []) + [None] * (size - len(example.group or []))
        for j, ids in enumerate(slots):
            mask[i, j] = ids is not None
            rows.append(Example(ids or [pad_id], [], label=0))
    batch = collate_padded(rows, pad_id)
    batch["attention_mask"][~mask.reshape(-1)] = 0
    batch["attention_mask"][~mask.reshape(-1), 0] = 1  # one visible token keeps empty slots finite; they are masked out of the loss
    batch["group_mask"] = mask
    if examples[0].label is not None:
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    else:
        del batch["labels"]
    batch["weights"] = torch.tensor([e.weight for e in examples], dtype=torch.float32)
    return batch
