"""What the trainer and the final save need for one run, and the batch builders heads share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.data import DataBundle, Example
from tunelab.data.collate_heads import collate_head_batch
from tunelab.data.masking import MaskingCollate
from tunelab.errors import UserError
from tunelab.methods.config import HeadConfig
from tunelab.train.config import TrainConfig
from tunelab.train.objectives import Objective
from tunelab.train.objectives.config import MaskedLMConfig
from tunelab.train.samplers import Sampler

Collate = Callable[[list[Example]], dict[str, torch.Tensor]]


@dataclass
class Prepared:
    """Everything the trainer and the final save need for one run."""

    model: torch.nn.Module
    tokenizer: Any
    source: str
    data: DataBundle
    objective: Objective
    collate: Collate
    save: Callable[[Path, torch.nn.Module], Path]  # writes RUN_DIR/final from the trained model (under fsdp its gathered copy), returns it
    train_cfg: TrainConfig
    #: Data order; None is the trainer's default (a seeded shuffle).
    sampler: Sampler | None = None
    #: False when a step may leave some trainable parameters without a gradient (multi-task heads):
    #: DDP must then look for unused parameters.
    uses_all_parameters: bool = True
    #: The model class family the run trains (``load_model``'s task): what a scoring teacher loads as.
    model_task: str = "causal-lm"
    #: One line per setting chosen for the user (``auto`` values), to print at the start of the run.
    notes: list[str] = field(default_factory=list)


def masking(objective: Any) -> MaskedLMConfig:
    """How masked-LM batches corrupt tokens: the chosen objective's settings when it is masked LM, else the defaults."""
    return objective if isinstance(objective, MaskedLMConfig) else MaskedLMConfig()


def head_collate(head: HeadConfig, mask: MaskedLMConfig, tokenizer: Any, seed: int) -> Collate:
    """Batches for ``head``: masked for masked LM (rate and whole-word from ``mask``), padded with task tensors otherwise."""
    pad_id = pad_token_id(tokenizer)
    if head.type == "masked_lm":
        if tokenizer.mask_token_id is None:
            raise UserError("the tokenizer has no mask token, so masked LM cannot train", hint="use an encoder model such as minilm-l6")
        return MaskingCollate(
            pad_id=pad_id, mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer), special_ids=frozenset(tokenizer.all_special_ids),
            rate=mask.mask_rate, whole_word=mask.whole_word, seed=seed,
        )
    return lambda examples: collate_head_batch(examples, pad_id)


def pad_token_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
