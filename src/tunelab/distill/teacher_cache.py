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
(its path and files' sizes and times), k and the training examples. It is written in shards of
``SHARD_EXAMPLES`` examples, each one atomically as it completes: memory while building stays one
shard's worth whatever the data's size, and a killed precomputation resumes at the first missing
shard. The cache counts as built only once its top-level ``index.json`` exists.
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


@dataclass
class TeacherCache:
    """Memory-mapped top-k teacher logits for a set of examples, in shards."""

    values: list[np.ndarray]  # per shard [positions, k] float32
    indices: list[np.ndarray]  # per shard [positions, k] int32
    where: dict[str, tuple[int, int, int]]  # example key -> (shard, first row, rows)
    directory: Path

    @classmethod
    def open_or_build(
        cls, examples: Sequence[Example], top_k: int, teacher_id: str,
        compute: Callable[[list[Example]], tuple[torch.Tensor, torch.Tensor]], *, show_progress: bool = True,
    ) -> TeacherCache:
        """The cache for ``examples``, built with ``compute(examples) -> (values, indices)`` (the
        teacher's top-k at the examples' supervised positions, in order) where it is missing."""
        keys = [example_key(e.input_ids, _example_supervised(e)) for e in examples]
        fingerprint = hashlib.sha256(f"{teacher_id}|k={top_k}|sharded|{'/'.join(sorted(set(keys)))}".encode()).hexdigest()[:20]
        directory = cache_root() / "teacher_outputs" / fingerprint
        if not (directory / "index.json").exists():
            _build(directory, examples, keys, compute, show_progress)
        where = {k: tuple(v) for k, v in json.loads((directory / "index.json").read_text()).items()}
        shards = sorted(directory.glob("shard-*"))
        return cls(
            [np.load(shard / "values.npy", mmap_mode="r") for shard in shards],
            [np.load(shard / "indices.npy", mmap_mode="r") for shard in shards],
            where, directory,  # type: ignore[arg-type]
        )

    def lookup(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The teacher's ``(values, indices)`` at ``batch``'s supervised positions, or None when
        any of its examples is not cached."""
        spans = [self.where.get(key) for key in batch_keys(batch)]
        if any(span is None for span in spans):
            return None
        k = self.values[0].shape[1] if self.values else 0
        values = [np.asarray(self.values[shard][first : first + count]) for shard, first, count in spans]  # type: ignore[misc]
        indices = [np.asarray(self.indices[shard][first : first + count]) for shard, first, count in spans]  # type: ignore[misc]
        return (
            torch.from_numpy(np.concatenate(values) if values else np.zeros((0, k), np.float32)),
            torch.from_numpy((np.concatenate(indices) if indices else np.zeros((0, k), np.int32)).astype(np.int64)),
        )


#: Examples per shard: a shard's top-64 logits for ~100-token answers are ~200 MB.
SHARD_EXAMPLES = 4096


def _build(
    directory: Path, examples: Sequence[Example], keys: list[str],
    compute: Callable[[list[Example]], tuple[torch.Tensor, torch.Tensor]], show_progress: bool,
) -> None:
    """Compute the shards ``directory`` lacks (one at a time, each written atomically), then the index."""
    unique = list({key: example for key, example in zip(keys, examples)}.items())
    directory.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale(directory)
    where: dict[str, tuple[int, int, int]] = {}
    shards = [unique[i : i + SHARD_EXAMPLES] for i in range(0, len(unique), SHARD_EXAMPLES)]
    done = sum(len(shard) for number, shard in enumerate(shards) if (directory / f"shard-{number:05d}").exists())
    with tqdm(total=len(unique), initial=done, desc="teacher outputs", unit="example", disable=not show_progress, mininterval=1.0) as progress:
        for number, shard in enumerate(shards):
            folder = directory / f"shard-{number:05d}"
            if not folder.exists():
                _write_shard(folder, shard, compute, progress)
            offset = 0
            for key, example in shard:
                count = sum(_example_supervised(example))
                where[key] = (number, offset, count)
                offset += count
    atomic.write_text(directory / "index.json", json.dumps(where))


def _write_shard(
    folder: Path, shard: list[tuple[str, Example]], compute: Callable[[list[Example]], tuple[torch.Tensor, torch.Tensor]], progress: tqdm
) -> None:
    values: list[np.ndarray] = []
    indices: list[np.ndarray] = []
    for start in range(0, len(shard), BUILD_BATCH):
        chunk = [example for _, example in shard[start : start + BUILD_BATCH]]
        top_values, top_indices = compute(chunk)
        values.append(top_values.float().numpy())
        indices.append(top_indices.to(torch.int32).numpy())
        progress.update(len(chunk))
    with atomic.directory(folder) as tmp:
        np.save(tmp / "values.npy", np.concatenate(values))
        np.save(tmp / "indices.npy", np.concatenate(indices))
