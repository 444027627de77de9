"""The base model's scores, kept on disk: a second run on the same task does not recompute them.

Every ``tunelab train`` with ``eval.after_training`` scores the base model before it scores the
run, and the base model is the same from one run to the next: on SmolLM2 that "before" row is
minutes of a run's wall time. A result is stored under ``<tunelab cache>/eval_scores/<key>.json``,
keyed by everything that can change it:

- the model's files (``model_fingerprint``: names, sizes, modification times) or tiny config;
- the evaluation file's bytes, and the pool's when demonstrations are drawn from it, and the
  bytes of the image files their rows name (``data.images``);
- the evaluation settings (the ``eval:`` section, shots, chat template), except those that
  cannot change a score (``batch_size``, ``after_training``, ``ensemble``);
- the scoring code itself (the bytes of the ``tunelab.evaluate`` sources) and the versions of
  tunelab, torch and transformers, so a fix to scoring never serves a stale number.

Only base models are cached: a run directory is usually evaluated once, right after it is made.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from tunelab import atomic
from tunelab.data.bad_rows import BadRows
from tunelab.data.images import shorthand_images
from tunelab.data.readers import read_rows
from tunelab.models.cache import cache_root, model_fingerprint

#: What a reused result's source ends with.
REUSED = "reused from the cache"
#: Settings that do not change a score (within 1e-5) and so stay out of the key.
IGNORED_SETTINGS = ("batch_size", "after_training", "ensemble")


@functools.cache
def _code_fingerprint() -> str:
    import torch
    import transformers

    import tunelab

    digest = hashlib.sha256(f"{tunelab.__version__}|{torch.__version__}|{transformers.__version__}".encode())
    for source in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def _file_digest(path: str | None) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else "-"


def _images_digest(path: str | None) -> str:
    """The bytes of the image files the rows reference: an image replaced in place changes the
    score though the data file does not change (data URLs are in the file's own bytes)."""
    if not path:
        return "-"
    digest = hashlib.sha256()
    for row in read_rows(path, BadRows("error")):
        for ref in shorthand_images(row.fields, row.where):
            if not ref.startswith("data:"):
                digest.update(ref.encode() + Path(ref).read_bytes())
    return digest.hexdigest()


def score_key(model: str, seed: int, setup: Any, shots: int) -> str:
    """The cache key of ``model``'s scores at ``shots`` demonstrations under ``setup`` (an EvalSetup)."""
    settings = {k: v for k, v in setup.cfg.model_dump(mode="json").items() if k not in IGNORED_SETTINGS}
    parts = {
        "model": model_fingerprint(model, seed),
        "data": _file_digest(setup.data),
        "pool": _file_digest(setup.pool) if shots else "-",
        "images": _images_digest(setup.data) + (_images_digest(setup.pool) if shots else ""),
        "settings": settings,
        "chat_template": setup.chat_template,
        "shots": shots,
        "code": _code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cache_dir() -> Path:
    """Where stored results live (tests point it at a temporary folder)."""
    return cache_root() / "eval_scores"


def _path(key: str) -> Path:
    return cache_dir() / f"{key}.json"


def load_scores(key: str) -> dict[str, Any] | None:
    """A stored result (``source``, ``seconds``, ``scores``, ``records``), or None."""
    path = _path(key)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # absent, or cut short by a full disk: recompute
        return None


def store_scores(key: str, source: str, seconds: float, scores: dict[str, float], records: list[dict[str, Any]]) -> None:
    """Keep a result (written atomically: a reader never sees half a file)."""
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"source": source, "seconds": seconds, "scores": scores, "records": records}
    atomic.write_text(path, json.dumps(payload))
