"""``/v1/fine_tuning/jobs``: create, list, retrieve, cancel, pause, resume, events, checkpoints.

Creation checks what can be checked without reading the file (the model exists, the files exist
and belong to the caller, hyperparameters are in range) and answers 400 with the offending
``param``; what the file *contains* is checked by the worker, which fails the job with OpenAI's
error codes, as OpenAI does. ``"auto"`` hyperparameters are echoed as ``"auto"`` until the job
starts, then as the numbers tunelab chose (``tunelab.train.auto_settings``).
"""

from __future__ import annotations

from typing import Any, Literal, Union

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from tunelab.serve.context import ORGANIZATION, caller, state
from tunelab.serve.errors import bad_request, not_found
from tunelab.serve.store import new_id, now

router = APIRouter()

KIND, EVENT, CHECKPOINT = "job", "event", "checkpoint"
FINISHED = ("succeeded", "failed", "cancelled")

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    """OpenAI's supervised (and DPO) hyperparameters: each ``"auto"`` or a number in range."""

    model_config = ConfigDict(extra="forbid")
    batch_size: Union[Auto, int] = Field("auto")
    learning_rate_multiplier: Union[Auto, float] = Field("auto")
    n_epochs: Union[Auto, int] = Field("auto")
    beta: Union[Auto, float, None] = None

    def check(self, param: str) -> None:
        if self.batch_size != "auto" and not 1 <= self.batch_size <= 256:
            raise bad_request("batch_size must be between 1 and 256.", param=f"{param}.batch_size")
        if self.n_epochs != "auto" and not 1 <= self.n_epochs <= 50:
            raise bad_request("n_epochs must be between 1 and 50.", param=f"{param}.n_epochs")
        if self.learning_rate_multiplier != "auto" and not self.learning_rate_multiplier > 0:
            raise bad_request("learning_rate_multiplier must be greater than 0.", param=f"{param}.learning_rate_multiplier")
        if self.beta not in (None, "auto") and not 0 < self.beta <= 2:
            raise bad_request("beta must be in (0, 2].", param=f"{param}.beta")


class MethodHyperparameters(BaseModel):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: MethodHyperparameters | None = None
    dpo: MethodHyperparameters | None = None
    reinforcement: dict[str, Any] | None = None


class JobRequest(BaseModel):
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64)
    seed: int | None = Field(None, ge=0, le=2147483647)
    metadata: dict[str, str] | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    integrations: list[dict[str, Any]] | None = None


def _method_and_hyperparameters(request: JobRequest) -> tuple[str, Hyperparameters]:
    if request.method is None:
        hyper = request.hyperparameters or Hyperparameters()
        return "supervised", hyper
    kind = request.method.type
    if kind == "reinforcement":
        raise bad_request("method 'reinforcement' is not available on this server; use 'supervised' or 'dpo'.", param="method.type")
    section = request.method.supervised if kind == "supervised" else request.method.dpo
    hyper = section.hyperparameters if section else request.hyperparameters or Hyperparameters()
    if kind == "supervised" and hyper.beta is not None:
        raise bad_request("beta is a DPO hyperparameter.", param="method.supervised.hyperparameters.beta")
    if kind == "dpo" and hyper.beta is None:
        hyper = hyper.model_copy(update={"beta": "auto"})
    return kind, hyper


@router.post("/fine_tuning/jobs")
def create(request: Request, body: JobRequest, owner: str | None = Depends(caller)) -> dict[str, Any]:
    st = state(request)
    if st.models.base_source(body.model) is None:
        raise bad_request(f"Model {body.model} is not available for fine-tuning or does not exist.", param="model", code="model_not_available")
    for param in ("training_file", "validation_file"):
        ident = getattr(body, param)
        if ident is not None and st.store.get("file", ident, owner=owner) is None:
            raise bad_request(f"invalid {param}: {ident}", param=param)
    if body.metadata is not None and (len(body.metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())):
        raise bad_request("metadata holds at most 16 pairs, keys up to 64 and values up to 512 characters.", param="metadata")
    kind, hyper = _method_and_hyperparameters(body)
    hyper.check(f"method.{kind}.hyperparameters" if body.method else "hyperparameters")
    numbers = hyper.model_dump(exclude={"beta"})  # the deprecated top-level field has no beta
    method = hyper.model_dump(exclude={"beta"} if kind == "supervised" else set())
    job = {
        "id": new_id("ftjob-"), "object": "fine_tuning.job", "created_at": now(), "error": None, "fine_tuned_model": None,
        "finished_at": None, "hyperparameters": numbers, "model": body.model, "organization_id": ORGANIZATION,
        "result_files": [], "seed": body.seed if body.seed is not None else 42, "status": "validating_files",
        "trained_tokens": None, "training_file": body.training_file, "validation_file": body.validation_file,
        "metadata": body.metadata, "method": {"type": kind, kind: {"hyperparameters": method}},
        "integrations": body.integrations or [], "user_provided_suffix": body.suffix, "estimated_finish": None,
    }
    st.store.insert(KIND, job, owner=owner)
    add_event(st.store, job["id"], f"Validating training file: {body.training_file}")
    st.worker.submit(job["id"])
    return job


def add_event(store: Any, job_id: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
    store.insert(EVENT, {"id": new_id("ftevent-"), "object": "fine_tuning.job.event", "created_at": now(), "level": level,
                         "message": message, "type": "metrics" if data is not None else "message", "data": data}, parent=job_id)


def get_job(request: Request, job_id: str, owner: str | None) -> dict[str, Any]:
    job = state(request).store.get(KIND, job_id, owner=owner)
    if job is None:
        raise not_found("fine-tuning job", job_id, param="fine_tuning_job_id")
    return job


def _metadata_filter(request: Request) -> dict[str, str]:
    """``metadata[k]=v`` query pairs (how the client encodes a metadata filter)."""
    return {key[len("metadata[") : -1]: value for key, value in request.query_params.items() if key.startswith("metadata[") and key.endswith("]")}


@router.get("/fine_tuning/jobs")
def list_jobs(request: Request, after: str | None = None, limit: int = 20, owner: str | None = Depends(caller)) -> dict[str, Any]:
    wanted = _metadata_filter(request)
    keep = (lambda job: all((job.get("metadata") or {}).get(k) == v for k, v in wanted.items())) if wanted else None
    items, more = state(request).store.page(KIND, after=after, limit=max(1, limit), owner=owner, keep=keep)
    return {"object": "list", "data": items, "has_more": more}


@router.get("/fine_tuning/jobs/{job_id}")
def retrieve(request: Request, job_id: str, owner: str | None = Depends(caller)) -> dict[str, Any]:
    return get_job(request, job_id, owner)


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel(request: Request, job_id: str, owner: str | None = Depends(caller)) -> dict[str, Any]:
    job = get_job(request, job_id, owner)
    if job["status"] in FINISHED:
        raise bad_request(f"Job {job_id} has already {job['status']}; only a queued, running or paused job can be cancelled.", param="fine_tuning_job_id")
    return state(request).worker.stop(job_id, "cancelled")


@router.post("/fine_tuning/jobs/{job_id}/pause")
def pause(request: Request, job_id: str, owner: str | None = Depends(caller)) -> dict[str, Any]:
    job = get_job(request, job_id, owner)
    if job["status"] not in ("validating_files", "queued", "running"):
        raise bad_request(f"Job {job_id} is {job['status']}; only a queued or running job can be paused.", param="fine_tuning_job_id")
    return state(request).worker.stop(job_id, "paused")


@router.post("/fine_tuning/jobs/{job_id}/resume")
def resume(request: Request, job_id: str, owner: str | None = Depends(caller)) -> dict[str, Any]:
    job = get_job(request, job_id, owner)
    if job["status"] != "paused":
        raise bad_request(f"Job {job_id} is {job['status']}; only a paused job can be resumed.", param="fine_tuning_job_id")
    return state(request).worker.resume(job_id)


@router.get("/fine_tuning/jobs/{job_id}/events")
def events(request: Request, job_id: str, after: str | None = None, limit: int = 20, owner: str | None = Depends(caller)) -> dict[str, Any]:
    get_job(request, job_id, owner)
    items, more = state(request).store.page(EVENT, after=after, limit=max(1, limit), parent=job_id)
    return {"object": "list", "data": items, "has_more": more}


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def checkpoints(request: Request, job_id: str, after: str | None = None, limit: int = 10, owner: str | None = Depends(caller)) -> dict[str, Any]:
    get_job(request, job_id, owner)
    items, more = state(request).store.page(CHECKPOINT, after=after, limit=max(1, limit), parent=job_id)
    return {"object": "list", "data": items, "has_more": more, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None}
