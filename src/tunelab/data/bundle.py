"""What the data stage hands to the trainer: tokenized examples and a report of what happened."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy (and Hugging Face models) skip


@dataclass
class Example:
    """One tokenized example.

    ``labels`` has the length of ``input_ids``, with ``IGNORE_INDEX`` where no loss is taken. For
    classification it is empty and ``label`` holds the class id. ``targets`` holds float targets
    (a regression value, or a multi-hot label vector). ``group`` holds several sequences that form
    one example (anchor, positive, negative — None where a row has no negative; or one sequence
    per answer choice, with ``label`` the correct one; or a preference pair, chosen then rejected,
    whose token labels are in ``group_labels``); ``input_ids`` is then the first of them.
    ``word_ids`` maps tokens to words (-1 for special tokens), for whole-word masking.
    ``weight``, ``difficulty``, ``language`` and ``task_name`` come from the row's columns on every
    data path (``data.weight_column`` etc.); ``task`` is the index of a multi-task run's task.
    ``pixel_values`` (``[n_images, 3, H, W]``) holds the images of a vision-language example, in
    the order of their placeholder tokens in ``input_ids``.
    """

    input_ids: list[int]
    labels: list[int]
    label: int | None = None
    weight: float = 1.0
    targets: list[float] | None = None
    group: list[list[int] | None] | None = None
    group_labels: list[list[int]] | None = None
    word_ids: list[int] | None = None
    difficulty: float | None = None
    language: str | None = None
    task_name: str | None = None
    task: int | None = None
    pixel_values: torch.Tensor | None = None


@dataclass
class DataReport:
    """Counts a user needs to trust the data: nothing is dropped or cut without being reported."""

    format: str
    template: str | None = None
    rows_read: int = 0
    bad_rows_skipped: int = 0
    bad_row_samples: list[str] = field(default_factory=list)
    duplicates_removed: int = 0
    truncated: int = 0
    clipped: int = 0  # texts cut by characters before tokenizing (also counted in truncated)
    dropped: int = 0
    train_examples: int = 0
    validation_examples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    label_names: list[str] | None = None
    tasks: dict[str, dict[str, Any]] | None = None  # multi-task runs: each task's own report
    augmented: dict[str, Any] | None = None  # data.augment: rows added per operation, samples

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (for the run directory's report)."""
        return asdict(self)


@dataclass
class DataBundle:
    """Train and validation examples, ready for ``collate_packed`` / ``collate_padded``."""

    train: list[Example]
    validation: list[Example]
    report: DataReport
    label_names: list[str] | None = None
