"""The FastAPI application: OpenAI's routes under ``/v1`` (and its error envelope), Cohere's
inference routes (``tunelab.serve.cohere``), API keys, request ids and access logs."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.serve import cohere, completions, files, jobs
from tunelab.serve.context import ServeSettings, ServeState
from tunelab.serve.errors import (
    APIError,
    api_error_handler,
    http_error_handler,
    unexpected_error_handler,
    validation_error_handler,
)
from tunelab.serve.inference import ModelPool
from tunelab.serve.store import Store
from tunelab.serve.task_models import TaskModels
from tunelab.serve.worker import JobWorker

access_log = logging.getLogger("tunelab.serve.access")


def create_app(settings: ServeSettings) -> FastAPI:
    """The service over ``settings.data_dir`` (opened now: a second server on the same directory
    fails here, with a one-line error); its job worker starts with the application."""
    store = Store(settings.data_dir)
    models = ModelPool(store, settings.extra_models)
    worker = JobWorker(settings, store, models)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.shutdown()
            store.close()

    app = FastAPI(title="tunelab", summary="OpenAI-compatible fine-tuning and inference over local models", lifespan=lifespan)
    app.state.tunelab = ServeState(settings, store, worker, models, TaskModels(models))
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    for router in (files.router, jobs.router, completions.router):
        app.include_router(router, prefix="/v1")
    app.include_router(cohere.router)

    @app.get("/health")
    def health() -> dict[str, object]:
        """Liveness, and how many models are in memory (counts only: no auth here)."""
        loaded = models.in_memory()
        return {"status": "ok", "models_in_memory": len(loaded), "adapters_in_memory": sum(map(len, loaded.values()))}

    @app.middleware("http")
    async def request_id_and_access_log(request: Request, call_next):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        request_id = "req_" + uuid.uuid4().hex
        response = await call_next(request)
        response.headers["x-request-id"] = request_id
        access_log.info(json.dumps({"time": round(time.time(), 3), "request_id": request_id, "method": request.method, "path": request.url.path,
                                    "status": response.status_code, "ms": round((time.perf_counter() - started) * 1000, 1)}))
        return response

    return app
