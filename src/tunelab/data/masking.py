"""Dynamic masking for masked-LM training (BERT's 80/10/10 recipe), reproducible by construction.

The mask of a batch is drawn from a generator seeded by the run's seed and the batch's own token
ids. So a batch is masked the same way however often it is built (resume, data parallelism and
evaluation need nothing extra), while training batches, which are regrouped every epoch, get
fresh masks each epoch, and validation batches keep one fixed mask, so before/after numbers
compare the same task.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tunelab.data.bundle import IGNORE_INDEX, Example
from tunelab.data.collate import collate_padded


@dataclass
class MaskingCollate:
    """Pads a batch of ``sentences`` examples and masks ``rate`` of their ordinary tokens."""

    pad_id: int
    mask_id: int
    vocab_size: int
    special_ids: frozenset[int]
    rate: float = 0.15
    whole_word: bool = False
    seed: int = 0

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        batch = collate_padded([Example(e.input_ids, []) for e in examples], self.pad_id)
        ids = batch["input_ids"]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(ids.numpy().tobytes()))
        candidates = batch["attention_mask"].bool() & ~torch.isin(ids, torch.tensor(sorted(self.special_ids), dtype=torch.long))
        chosen = self._choose(examples, candidates, generator)
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
        roll = torch.rand(ids.shape, generator=generator)
        masked = ids.clone()
        masked[chosen & (roll < 0.8)] = self.mask_id
        random_tokens = torch.randint(self.vocab_size, ids.shape, generator=generator)
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        masked[swap] = random_tokens[swap]
        return {"input_ids": masked, "attention_mask": batch["attention_mask"], "labels": labels}

    def _choose(self, examples: Sequence[Example], candidates: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Positions to predict: each candidate token (or, whole-word, each word) with probability ``rate``;
        at least one per sequence, so every example contributes to the loss."""
        draws = torch.rand(candidates.shape, generator=generator)
        if self.whole_word:
            for row, example in enumerate(examples):
                words = example.word_ids
                if words is not None:  # every token of a word takes its first token's draw
                    first: dict[int, float] = {}
                    for col, word in enumerate(words):
                        if word >= 0:
                            draws[row, col] = first.setdefault(word, float(draws[row, col]))
        chosen = candidates & (draws < self.rate)
        lowest = torch.where(candidates, draws, torch.full_like(draws, 2.0)).argmin(dim=1)
        none = ~chosen.any(dim=1) & candidates.any(dim=1)
        chosen[none, lowest[none]] = True
        return chosen
