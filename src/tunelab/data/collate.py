"""Batches: padding-free packing for causal LMs, right padding for everything else.

Packing puts a batch's examples end to end in one row, so no compute is spent on padding. Each
example's ``position_ids`` restart at 0; with no ``attention_mask`` given, transformers
(``masking_utils.find_packed_sequence_indices``) reads the restarts as sequence boundaries and
builds a block-diagonal causal mask for sdpa/eager/flex attention, so no token attends across an
example boundary.

Call the model with ``use_cache=False`` on packed batches: transformers only looks for packed
sequences when there is no KV cache, and models create one by default (``config.use_cache``),
even in training mode. With a cache, examples silently attend to each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tunelab.data.bundle import IGNORE_INDEX, Example


def collate_packed(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels``, ``position_ids``, each ``[1, total_tokens]``; no attention mask.

    Each example's first label is ``IGNORE_INDEX``: models shift labels left by one inside, so the
    last token of one example would otherwise be trained to predict the first of the next.
    """
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        if not example.labels:
            raise ValueError("collate_packed is for causal-LM examples (classification examples have no token labels)")
        input_ids += example.input_ids
        labels += [IGNORE_INDEX, *example.labels[1:]]
        positions += range(len(example.input_ids))
    batch = {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }
    if any(e.weight != 1.0 for e in examples):
        batch["weights"] = torch.tensor([[e.weight for e in examples for _ in e.input_ids]], dtype=torch.float32)
    return batch


def collate_padded(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` ``[B, longest]`` and ``labels``.

    ``labels`` is ``[B, longest]`` token labels (``IGNORE_INDEX`` on padding) for causal-LM
    examples, or a ``[B]`` tensor of class ids for classification examples.
    """
    if not examples:
        raise ValueError("collate_padded needs at least one example")
    classification = [e.label is not None for e in examples]
    if any(classification) and not all(classification):
        raise ValueError("collate_padded got a mix of classification and token-label examples")
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    token_labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        if example.labels:
            token_labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
    labels = torch.tensor([e.label for e in examples], dtype=torch.long) if all(classification) else token_labels
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any(e.weight != 1.0 for e in examples):
        weights = torch.tensor([e.weight for e in examples], dtype=torch.float32)
        batch["weights"] = weights if all(classification) else weights[:, None].expand(-1, longest).contiguous()
    return batch
