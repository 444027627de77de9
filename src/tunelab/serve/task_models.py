"""Models for Cohere's embed, rerank and classify: embedders and classifiers, loaded whole by name.

Generation goes through the shared-base pool (``inference.ModelPool``); these tasks need other
model shapes: a sentence-transformers model (the packaged all-MiniLM-L6-v2, or a run trained with
an embedding head, e.g. on Cohere rerank rows) embeds with its own pooling and normalisation, any
causal LM embeds by mean-pooling its last hidden states (what ``/v1/embeddings`` does), and a
run with a classification head classifies. A name resolves like everywhere in the server (base
aliases, ``--model`` directories, fine-tuned models), plus tunelab's encoder aliases.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab import rundir
from tunelab.models.registry import PACKAGED
from tunelab.models.tiny import TINY_MODELS
from tunelab.serve.context import Models
from tunelab.serve.errors import APIError
from tunelab.serve.inference import least_recently_used


@dataclass
class Embedder:
    """Unit-length embeddings of texts, and how many tokens they took."""

    embed_ids: Callable[[list[torch.Tensor]], tuple[list[torch.Tensor], int]]
    tokenizer: Any

    def embed(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        ids = [self.tokenizer(text, return_tensors="pt", truncation=True)["input_ids"] for text in texts]
        vectors, tokens = self.embed_ids(ids)
        return torch.stack(vectors), tokens


@dataclass
class Classifier:
    """A run with a classification head: label probabilities for texts."""

    model: Any
    tokenizer: Any
    labels: list[str]
    multi_label: bool
    lock: threading.Lock

    def probabilities(self, texts: list[str]) -> torch.Tensor:
        """``[len(texts), labels]``: softmax for single-label heads, independent sigmoids for multi-label."""
        rows = []
        with self.lock, torch.no_grad():
            for text in texts:
                batch = self.tokenizer(text, return_tensors="pt", truncation=True)
                logits = self.model(**batch).logits[0].float()
                rows.append(torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, -1))
        return torch.stack(rows)


class TaskModels:
    """Embedders and classifiers by model name, at most ``capacity`` kept in memory."""

    def __init__(self, pool: Models, capacity: int = 2) -> None:
        self.pool, self.capacity = pool, capacity
        self._loaded: OrderedDict[str, Embedder | Classifier] = OrderedDict()
        self._lock = threading.Lock()

    def source(self, name: str, owner: str | None) -> str:
        """What ``load_model`` loads for ``name``; 404 for a name the server does not know."""
        if name in PACKAGED or name in TINY_MODELS:
            return name
        self.pool.record(name, owner)  # 404 (in the client's shape) for unknown or someone else's model
        source = self.pool.base_source(name)
        if source is None:
            raise APIError(400, f"'{name}' is a checkpoint; embed, rerank and classify serve finished models.", param="model")
        return source

    def embedder(self, name: str, owner: str | None) -> Embedder:
        source = self.source(name, owner)
        directory = sentence_transformers_dir(source)
        if directory is None:  # a causal LM: mean-pooled hidden states, through the generation pool
            from tunelab.serve.completions import embed_ids

            loaded = self.pool.load(name, owner)
            return Embedder(lambda ids: embed_ids(loaded, ids), loaded.tokenizer)
        return self._cached(f"embed:{directory}", lambda: _sentence_embedder(directory))  # type: ignore[return-value]

    def classifier(self, name: str, owner: str | None) -> Classifier:
        source = self.source(name, owner)
        path = Path(source)
        manifest = rundir.read_manifest(path) if rundir.is_run_dir(path) else {}
        if manifest.get("model_task") != "sequence-classification":
            raise APIError(400, f"'{name}' has no classification head; classify serves runs trained with method.head "
                           "{type: classification | multi_label} (a Cohere classification file trains one).", param="model")
        return self._cached(f"classify:{path}", lambda: _classifier(path, manifest))  # type: ignore[return-value]

    def _cached(self, key: str, build: Callable[[], Embedder | Classifier]) -> Embedder | Classifier:
        return least_recently_used(self._loaded, self._lock, key, build, self.capacity)  # type: ignore[no-any-return]


def sentence_transformers_dir(source: str) -> Path | None:
    """The sentence-transformers directory of ``source`` (an alias, a model directory or a run), if any."""
    location = PACKAGED[source].location() if source in PACKAGED else Path(source).expanduser()
    if location is None:
        return None
    for candidate in (location / "final" / "model", location / "model", location):
        if (candidate / "modules.json").is_file():
            return candidate
    return None


def _sentence_embedder(directory: Path) -> Embedder:
    from tunelab.train.embedding_artifacts import load_embedder

    model, tokenizer = load_embedder(directory)
    lock = threading.Lock()

    def embed_ids(ids: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        with lock, torch.no_grad():
            vectors = [torch.nn.functional.normalize(model(x, torch.ones_like(x))[0].float(), dim=0) for x in ids]
        return vectors, sum(x.shape[1] for x in ids)

    return Embedder(embed_ids, tokenizer)


def _classifier(path: Path, manifest: dict[str, Any]) -> Classifier:
    from tunelab.models.load import load_model

    loaded = load_model(str(path), "sequence-classification")
    config = loaded.model.config
    labels = manifest.get("label_names") or [config.id2label[i] for i in range(config.num_labels)]
    head = (manifest.get("method") or {}).get("head") or {}
    multi = head.get("type") == "multi_label" or getattr(config, "problem_type", None) == "multi_label_classification"
    return Classifier(loaded.model.eval(), loaded.tokenizer, list(labels), multi, threading.Lock())
