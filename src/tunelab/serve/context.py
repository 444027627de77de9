"""What every route needs: the settings, the store, and who is calling."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fastapi import Request

from tunelab.serve.errors import APIError
from tunelab.serve.store import Store

#: OpenAI's organization slot in fine-tuned model names (``ft:{base}:{org}:{suffix}:{id}``).
ORGANIZATION = "tunelab"


@dataclass
class ServeSettings:
    """How the server was started (``tunelab serve`` options)."""

    data_dir: Path
    #: API key -> owner name; empty: no authentication (only sensible on 127.0.0.1).
    api_keys: dict[str, str] = field(default_factory=dict)
    max_upload_bytes: int = 512 * 2**20
    #: Jobs trained at once; the cores are divided between them.
    workers: int = 1
    #: Model directories (or aliases) offered as base models besides tunelab's registry.
    extra_models: tuple[str, ...] = ()
    #: Recipe defaults a job starts from (tests use tiny settings).
    job_defaults: dict = field(default_factory=dict)


class Jobs(Protocol):
    """What the routes ask of the job worker (``tunelab.serve.worker.JobWorker``)."""

    def submit(self, job_id: str, resume: bool = False) -> None: ...
    def stop(self, job_id: str, status: str) -> dict[str, Any]: ...
    def resume(self, job_id: str) -> dict[str, Any]: ...


class Models(Protocol):
    """What the routes ask of the model pool (``tunelab.serve.inference.ModelPool``)."""

    def base_source(self, name: str) -> str | None: ...
    def listing(self, owner: str | None) -> list[dict[str, Any]]: ...
    def record(self, name: str, owner: str | None) -> dict[str, Any]: ...
    def delete(self, name: str, owner: str | None) -> None: ...
    def load(self, name: str, owner: str | None) -> Any: ...


@dataclass
class ServeState:
    settings: ServeSettings
    store: Store
    worker: Jobs
    models: Models
    #: Embedders and classifiers for Cohere's embed, rerank and classify (``serve.task_models``).
    heads: Any = None


def state(request: Request) -> ServeState:
    return request.app.state.tunelab


def caller(request: Request) -> str | None:
    """The owner of the request's API key (None when the server has no keys); 401 otherwise."""
    keys = state(request).settings.api_keys
    if not keys:
        return None
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    for key, owner in keys.items():
        if token and hmac.compare_digest(token.encode(), key.encode()):
            return owner
    raise APIError(401, "Incorrect API key provided." if token else "You didn't provide an API key.",
                   type="invalid_request_error", code="invalid_api_key")
