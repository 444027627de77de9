"""Batches: padding-free packing for causal LMs, right padding for everything else.

Packing puts a batch's examples end to end in one row, so no compute is spent on padding. Each
example's ``position_ids`` restart at 0; with no ``attention_mask`` given, transformers
(``masking_utils.find_packed_sequence_indices``) reads the restarts as sequence boundaries and
builds a block-diagonal causal mask for sdpa/eager/flex attention, so no token attends across an
example boundary.

Call the model with ``use_cache=False`` on packed batches: transformers only looks for packed
sequences when there is no KV cache, and models create one by default (``config.use_cache``),
even in training mode. With a cache, examples silently attend to each other.

A packed row can also hold a **shared prefix** once (``share_prefix=True``): chat rows usually
start with the same system prompt and instruction, and the two answers of a preference pair with
the same prompt; computing those tokens once instead of once per example is work avoided, not
approximated. A group of examples (the batch, or each pair) is then laid out as
``prefix + suffix_1 + suffix_2 + ...``; each suffix's ``position_ids`` continue from the prefix
length, and ``segment_bounds``/``segment_prefix`` in the batch tell the per-example attention
(``tunelab.train.varlen_attention``) to let every suffix attend to its prefix and to itself. Only
unsupervised tokens are shared, so every loss term is the one the example would get alone.

A packed row can end in a **padding segment** (``pad_packed_row``) that brings its length to a
multiple of a few dozen tokens, so that the row's matrix shapes repeat from step to step: CPU bf16
matmuls compile and cache a kernel per shape (``tunelab.train.shape_buckets``). The padding is
attended only by itself, carries no loss and belongs to no example.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tunelab.data.bundle import IGNORE_INDEX, Example

#: Shorter common prefixes are not worth the masked attention they turn the suffixes' into.
MIN_SHARED_PREFIX = 8
#: ``segment_prefix`` of a padding segment: like a whole example it attends only to itself, but it
#: is no example (``example_index`` gives its tokens -1, ``batch_tokens`` leaves them out).
PADDING_SEGMENT = -2


def _first_supervised(example: Example) -> int:
    """Index of the first label after position 0 that carries loss (the length if none does)."""
    return next((i for i, label in enumerate(example.labels) if i > 0 and label != IGNORE_INDEX), len(example.labels))


def supervised_end(example: Example) -> int:
    """How many leading tokens of ``example`` its loss can read: up to and including its last
    supervised token (the whole example when none is supervised)."""
    last = next((i for i in range(len(example.labels) - 1, 0, -1) if example.labels[i] != IGNORE_INDEX), None)
    return len(example.labels) if last is None else last + 1


def shared_prefix_length(examples: Sequence[Example]) -> int:
    """How many leading tokens all ``examples`` have in common and none supervises.

    Labels 1..P must carry no loss: position P-1, the prefix's last, is computed once, so it
    cannot predict a different supervised token for each example. Each example keeps at least one
    token of its own.
    """
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    limit = min(min(len(e.input_ids) - 1, _first_supervised(e) - 1) for e in examples)
    length = 0
    while length < limit and all(e.input_ids[length] == first[length] for e in examples):
        length += 1
    return length if length >= MIN_SHARED_PREFIX else 0


def prefix_groups(examples: Sequence[Example], group_size: int | None) -> list[Sequence[Example]]:
    """The groups whose common prefix a packed row may hold once: the whole batch, or consecutive
    runs of ``group_size`` examples (a preference pair's chosen and rejected answers share their
    prompt, which the whole batch does not)."""
    if group_size is None:
        return [examples]
    return [examples[i : i + group_size] for i in range(0, len(examples), group_size)]


def collate_packed(examples: Sequence[Example], share_prefix: bool = False, group_size: int | None = None,
                   drop_unread_inputs: bool = False) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels``, ``position_ids``, each ``[1, total_tokens]``; no attention mask.

    Each example's first label is ``IGNORE_INDEX``: models shift labels left by one inside, so the
    last token of one example would otherwise be trained to predict the first of the next. With
    ``share_prefix``, each group (``prefix_groups``) whose common prefix is at least
    ``MIN_SHARED_PREFIX`` tokens is laid out as that prefix once, then each example's suffix, and
    the batch gains ``segment_bounds`` (``[S + 1]`` token offsets of the row's segments),
    ``segment_prefix`` (``[S]``: for a suffix, the index of the prefix segment it continues; -1
    for a prefix or a whole example) and ``example_tokens`` (the examples' own token count, ``[1]``,
    for throughput figures).

    With ``drop_unread_inputs``, the row leaves out the input tokens that no supervised target
    reads. Each example ends at its last supervised token (``supervised_end``): the tokens after it
    predict nothing that carries loss and, under causal attention, no earlier position reads them
    (ChatML's newline after ``<|im_end|>``). That last token is itself only a target: the position
    before it predicts it and nothing reads its input. So it is left out too, and its label goes to
    the next segment's first label slot, the one position ``t`` reads as ``labels[t + 1]`` and that
    the layout otherwise leaves empty (with its example's weight beside it); the row's last example
    keeps it, having no next slot. A loss over supervised tokens is the same to the bit; on the
    benchmark's short chat rows 2 of ~45 tokens per example go. Only for objectives whose loss
    reads nothing else (``CausalLMObjective.drops_unread_inputs``: a moved label sits in the next
    example's segment, which per-example accounting such as ``example_index`` would misread);
    ``example_tokens`` still counts every token the examples hold.
    """
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    if not all(e.labels for e in examples):
        raise ValueError("collate_packed is for causal-LM examples (classification examples have no token labels)")
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    weights: list[float] = []
    bounds, prefix_of = [0], []
    carried: tuple[int, float] | None = None  # a moved label and its weight, for the next segment's first slot
    placed = 0
    for group in prefix_groups(examples, group_size):
        # An image's placeholder tokens are the same ids whatever the image: never shared.
        prefix = shared_prefix_length(group) if share_prefix and not any(e.pixel_values is not None for e in group) else 0
        if prefix:
            input_ids += group[0].input_ids[:prefix]
            first, weight = carried or (IGNORE_INDEX, 1.0)  # 1.0: never read unless a label was moved here
            labels += [first] + [IGNORE_INDEX] * (prefix - 1)
            positions += range(prefix)
            weights += [weight] + [1.0] * (prefix - 1)
            bounds.append(len(input_ids))
            prefix_of.append(-1)
            carried = None
        prefix_index = len(prefix_of) - 1 if prefix else -1
        for example in group:
            placed += 1
            end = supervised_end(example) if drop_unread_inputs else len(example.input_ids)
            moves = drop_unread_inputs and placed < len(examples) and end - 1 > prefix and example.labels[end - 1] != IGNORE_INDEX
            stop = end - 1 if moves else end
            first, weight = carried or (IGNORE_INDEX, example.weight)
            input_ids += example.input_ids[prefix:stop]
            labels += [first, *example.labels[prefix + 1 : stop]]
            positions += range(prefix, stop)
            weights += [weight] + [example.weight] * (stop - prefix - 1)
            bounds.append(len(input_ids))
            prefix_of.append(prefix_index)
            carried = (example.labels[end - 1], example.weight) if moves else None
    batch = {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }
    if any(e.weight != 1.0 for e in examples):
        batch["weights"] = torch.tensor([weights], dtype=torch.float32)
    _add_pixels(batch, examples)
    if any(p >= 0 for p in prefix_of):
        batch["segment_bounds"] = torch.tensor(bounds, dtype=torch.int32)
        batch["segment_prefix"] = torch.tensor(prefix_of, dtype=torch.long)
    held = sum(len(e.input_ids) for e in examples)
    if held != len(input_ids):
        batch["example_tokens"] = torch.tensor([held])
    return batch


def pad_packed_row(batch: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """``batch`` (a ``collate_packed`` row) lengthened to the next multiple of ``multiple`` tokens
    by a padding segment: token 0 at positions 0, 1, ..., no label, weight 0, segment prefix
    ``PADDING_SEGMENT``. The row gains ``segment_bounds``/``segment_prefix`` and
    ``example_tokens`` if it had none, so the padding is told apart from an example; only
    per-example attention (``tunelab.train.varlen_attention``) reads that layout."""
    length = batch["input_ids"].shape[1]
    pad = -length % multiple
    if pad == 0:
        return batch
    out = dict(batch)
    if "segment_bounds" not in batch:
        starts = torch.nonzero(batch["position_ids"][0] == 0).flatten().tolist()
        out["segment_bounds"] = torch.tensor([*starts, length], dtype=torch.int32)
        out["segment_prefix"] = torch.full((len(starts),), -1, dtype=torch.long)
        out.setdefault("example_tokens", torch.tensor([length]))  # a row whose tails were dropped already counts its examples
    out["segment_bounds"] = torch.cat([out["segment_bounds"], torch.tensor([length + pad], dtype=torch.int32)])
    out["segment_prefix"] = torch.cat([out["segment_prefix"], torch.tensor([PADDING_SEGMENT])])
    out["input_ids"] = torch.cat([batch["input_ids"], batch["input_ids"].new_zeros(1, pad)], dim=1)
    out["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((1, pad), IGNORE_INDEX)], dim=1)
    out["position_ids"] = torch.cat([batch["position_ids"], torch.arange(pad, dtype=batch["position_ids"].dtype)[None]], dim=1)
    if "weights" in batch:
        out["weights"] = torch.cat([batch["weights"], batch["weights"].new_zeros(1, pad)], dim=1)
    return out


def example_index(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """For every token of a batch, the index of the example it belongs to (``[B, T]``; -1 for a
    shared prefix or padding). Padded batches hold one example per row; packed rows start an
    example where the positions restart, or at each segment of a segmented row that is neither a
    prefix nor padding."""
    ids = batch["input_ids"]
    if "attention_mask" in batch:
        return torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)
    if "segment_bounds" not in batch:
        return (batch["position_ids"] == 0).long().cumsum(-1) - 1
    bounds, prefix_of = batch["segment_bounds"].tolist(), batch["segment_prefix"].tolist()
    prefixes = {j for j in prefix_of if j >= 0}
    index = torch.full_like(ids, -1)
    count = 0
    for segment, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if segment not in prefixes and prefix_of[segment] != PADDING_SEGMENT:
            index[:, start:end] = count
            count += 1
    return index


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens of the examples in ``batch``: padding not counted, a shared prefix counted once
    per example (what the examples hold, however the row is laid out)."""
    if "example_tokens" in batch:
        return int(batch["example_tokens"].sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


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
    _add_pixels(batch, examples)
    return batch


def _add_pixels(batch: dict[str, torch.Tensor], examples: Sequence[Example]) -> None:
    """``pixel_values`` of every image in the batch, in the order their placeholder tokens come
    (row by row, left to right), which is the order the model fills them in."""
    pixels = [e.pixel_values for e in examples if e.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)


def preference_sequences(examples: Sequence[Example]) -> list[Example]:
    """Preference pairs as the sequences the model reads: chosen 0, rejected 0, chosen 1, ...
    (sequence ``2i`` is pair ``i``'s chosen answer, ``2i + 1`` its rejected one)."""
    sequences = []
    for example in examples:
        if example.group is None or example.group_labels is None or len(example.group_labels) != 2:
            raise ValueError("preference batches need examples with a chosen and a rejected sequence")
        for ids, labels in zip(example.group, example.group_labels, strict=True):
            assert ids is not None
            sequences.append(Example(ids, labels, weight=example.weight))
    return sequences
