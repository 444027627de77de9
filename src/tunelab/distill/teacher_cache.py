"""Teacher outputs computed once and kept on disk: later epochs, resumed runs and other students
read the teacher's top-k logits from a memory-mapped file instead of running the teacher again.

Only the k largest teacher logits (and their token ids) per supervised position are stored:
k = 64 of SmolLM2's 49,152 is 0.1% of the full distribution and, for a fine-tuned teacher,
nearly all of its probability mass. Top-k distillation from the cache is exactly top-k
distillation from the live teacher (the values are stored in float32).

Each example is found by a hash of its tokens and its supervised positions, so the cache needs
no example ids in the batch: the packed row (or padded rows) is split into its examples and each
one is looked up. A batch with any example the cache lacks (validation rows) runs the teacher live.

The cache lives under ``<tunelab cache>/teacher_outputs/<fingerprint>``, keyed by the teacher
(its path and files' sizes and times), k and the training examples; it is written into a
temporary folder and renamed, so a killed precomputation leaves nothing half-usable.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tunelab import atomic
from tunelab.data.bundle import IGNORE_INDEX, Example
from tunelab.models.cache import cache_root

#: Examples the teacher reads at once while the cache is built.
BUILD_BATCH = 8


def example_key(input_ids: Sequence[int], supervised: Sequence[bool]) -> str:
    """Identity of one example as the objective sees it: its tokens and which next tokens carry loss."""
    digest = hashlib.sha1(np.asarray(input_ids, dtype=np.int64).tobytes())
    digest.update(np.asarray(supervised, dtype=np.bool_).tobytes())
    return digest.hexdigest()


def _example_supervised(example: Example) -> list[bool]:
    """Which positions t (predicting t+1) are picked, as collation leaves them (first label ignored)."""
    labels = [IGNORE_INDEX, *example.labels[1:]]
    return [label != IGNORE_INDEX for label in labels[1:]]


def segments(batch: dict[str, torch.Tensor]) -> Iterator[tuple[int, int, int]]:
    """``(row, start, end)`` of every example in a packed row (position ids restart at 0) or in
    right-padded rows (one example per row, ``attention_mask`` marks its tokens)."""
    if "attention_mask" in batch:
        for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            yield row, 0, int(length)
        return
    for row, positions in enumerate(batch["position_ids"]):
        starts = (positions == 0).nonzero().flatten().tolist() + [positions.numel()]
        for start, end in itertools.pairwise(starts):
            yield row, start, end


def batch_keys(batch: dict[str, torch.Tensor]) -> list[str]:
    """The cache key of every example in ``batch``, in the order its supervised positions are picked."""
    ids, labels = batch["input_ids"], batch["labels"]
    keys = []
    for row, start, end in segments(batch):
        supervised = (labels[row, start + 1 : end] != IGNORE_INDEX).tolist()
        keys.append(example_key(ids[row, start:end].tolist(), supervised))
    return keys


def teacher_fingerprint(name: str, seed: int) -> str:
    """The teacher's identity: a path's files (names, sizes, times) or an alias and its seed."""
    path = Path(name).expanduser()
    if not path.exists():
        return f"{name}|seed={seed}"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and "checkpoints" not in p.parts)
    return "|".join(f"{p.relative_to(path.parent)}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files)


@dataclass
class TeacherCache:
    """Memory-mapped top-k teacher logits for a set of examples."""

    values: np.ndarray  # [positions, k] float32
    indices: np.ndarray  # [positions, k] int32
    where: dict[str, tuple[int, int]]  # example key -> (first row, rows)
    directory: Path

    @classmethod
    def open_or_build(
        cls, examples: Sequence[Example], top_k: int, teacher_id: str,
        compute: Callable[[list[Example]], tuple[torch.Tensor, torch.Tensor]], *, show_progress: bool = True,
    ) -> TeacherCache:
        """The cache for ``examples``, built with ``compute(examples) -> (values, indices)`` (the
        teacher's top-k at the examples' supervised positions, in order) when it does not exist."""
        keys = [example_key(e.input_ids, _example_supervised(e)) for e in examples]
        fingerprint = hashlib.sha256(f"{teacher_id}|k={top_k}|{'/'.join(sorted(set(keys)))}".encode()).hexdigest()[:20]
        directory = cache_root() / "teacher_outputs" / fingerprint
        if not (directory / "index.json").exists():
            _build(directory, examples, keys, top_k, compute, show_progress)
        where = {k: tuple(v) for k, v in json.loads((directory / "index.json").read_text()).items()}
        return cls(np.load(directory / "values.npy", mmap_mode="r"), np.load(directory / "indices.npy", mmap_mode="r"), where, directory)  # type: ignore[arg-type]

    def lookup(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The teacher's ``(values, indices)`` at ``batch``'s supervised positions, or None when
        any of its examples is not cached."""
        spans = [self.where.get(key) for key in batch_keys(batch)]
        if any(span is None for span in spans):
            return None
        rows = np.concatenate([np.arange(first, first + count) for first, count in spans]) if spans else np.zeros(0, dtype=np.int64)  # type: ignore[misc]
        return torch.from_numpy(np.asarray(self.values[rows])), torch.from_numpy(np.asarray(self.indices[rows]).astype(np.int64))


def _build(
    directory: Path, examples: Sequence[Example], keys: list[str], top_k: int,
    compute: Callable[[list[Example]], tuple[torch.Tensor, torch.Tensor]], show_progress: bool,
) -> None:
    unique = list({key: example for key, example in zip(keys, examples)}.items())
    values: list[np.ndarray] = []
    indices: list[np.ndarray] = []
    where: dict[str, tuple[int, int]] = {}
    offset = 0
    with tqdm(total=len(unique), desc="teacher outputs", unit="example", disable=not show_progress, mininterval=1.0) as progress:
        for start in range(0, len(unique), BUILD_BATCH):
            chunk = unique[start : start + BUILD_BATCH]
            top_values, top_indices = compute([example for _, example in chunk])
            cursor = 0
            for key, example in chunk:
                count = sum(_example_supervised(example))
                where[key] = (offset + cursor, count)
                cursor += count
            values.append(top_values.float().numpy())
            indices.append(top_indices.to(torch.int32).numpy())
            offset += cursor
            progress.update(len(chunk))
    with atomic.directory(directory) as tmp:
        np.save(tmp / "values.npy", np.concatenate(values) if values else np.zeros((0, top_k), np.float32))
        np.save(tmp / "indices.npy", np.concatenate(indices) if indices else np.zeros((0, top_k), np.int32))
        (tmp / "index.json").write_text(json.dumps(where))
