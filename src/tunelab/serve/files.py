"""``/v1/files``: upload, list, retrieve, content, delete.

Uploads are stored under ``<data-dir>/files/<file id>`` (the user's ``filename`` is only a label,
so no name can reach outside the data directory), written atomically. A ``fine-tune`` upload is
checked for JSONL shape at once, as OpenAI does (400 with the line number); what a line must
contain is checked when a job uses the file, and fails the job instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Form, Request, UploadFile
from fastapi.responses import Response

from tunelab import atomic
from tunelab.serve.context import caller, state
from tunelab.serve.errors import APIError, bad_request, not_found
from tunelab.serve.store import Store, new_id, now

router = APIRouter()

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
KIND = "file"


#: Purposes whose uploads are checked to be JSONL, and stored with that suffix (the data readers
#: go by suffix).
JSONL_PURPOSES = ("fine-tune", "batch", "evals")


def file_path(data_dir: Path, file: dict[str, Any]) -> Path:
    """Where the file record ``file`` keeps its bytes (named by id, never by the user's filename)."""
    return data_dir / "files" / (file["id"] + (".jsonl" if file["purpose"] in JSONL_PURPOSES else ""))


def check_jsonl(data: bytes) -> None:
    """400 unless every non-empty line is a JSON object (OpenAI's upload-time check)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("Expected file to have JSONL format with UTF-8 text.", param="file", code="invalid_file_format") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise bad_request("The file is empty: expected one JSON object per line.", param="file", code="invalid_file_format")
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise bad_request(f"Expected file to have JSONL format, where every line is a JSON dictionary. Line {number} is not a dictionary.",
                              param="file", code="invalid_file_format")


def save_file(store: Store, data_dir: Path, data: bytes, filename: str, purpose: str, owner: str | None) -> dict[str, Any]:
    """Write ``data`` as a new file record (uploads, and the worker's result files)."""
    body = {"id": new_id("file-"), "object": "file", "bytes": len(data), "created_at": now(), "filename": Path(filename).name or "upload",
            "purpose": purpose, "status": "processed", "status_details": None}
    atomic.write_bytes(file_path(data_dir, body), data)
    return store.insert(KIND, body, owner=owner)


@router.post("/files")
async def upload(request: Request, file: UploadFile, purpose: str = Form(...), owner: str | None = Depends(caller)) -> dict[str, Any]:
    if purpose not in PURPOSES:
        raise bad_request(f"'{purpose}' is not one of {', '.join(PURPOSES)}.", param="purpose")
    limit = state(request).settings.max_upload_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise APIError(413, f"File is larger than the server's limit of {limit} bytes.", param="file", code="file_too_large")
    if purpose in JSONL_PURPOSES:
        check_jsonl(data)
    st = state(request)
    return save_file(st.store, st.settings.data_dir, data, file.filename or "upload", purpose, owner)


@router.get("/files")
def list_files(request: Request, after: str | None = None, limit: int = 10000, order: str = "desc", purpose: str | None = None,
               owner: str | None = Depends(caller)) -> dict[str, Any]:
    if order not in ("asc", "desc"):
        raise bad_request("order must be 'asc' or 'desc'.", param="order")
    items, more = state(request).store.page(KIND, after=after, limit=max(1, limit), owner=owner, newest_first=order == "desc",
                                            keep=(lambda f: f["purpose"] == purpose) if purpose else None)
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": more}


def get_file(request: Request, file_id: str, owner: str | None, param: str | None = None) -> dict[str, Any]:
    body = state(request).store.get(KIND, file_id, owner=owner)
    if body is None:
        raise not_found("file", file_id, param=param)
    return body


@router.get("/files/{file_id}")
def retrieve(request: Request, file_id: str, owner: str | None = Depends(caller)) -> dict[str, Any]:
    return get_file(request, file_id, owner)


@router.get("/files/{file_id}/content")
def content(request: Request, file_id: str, owner: str | None = Depends(caller)) -> Response:
    body = get_file(request, file_id, owner)
    data = file_path(state(request).settings.data_dir, body).read_bytes()
    media = "text/csv" if body["filename"].endswith(".csv") else "application/octet-stream"
    return Response(data, media_type=media)


@router.delete("/files/{file_id}")
def delete(request: Request, file_id: str, owner: str | None = Depends(caller)) -> dict[str, Any]:
    body = get_file(request, file_id, owner)
    st = state(request)
    st.store.delete(KIND, file_id)
    file_path(st.settings.data_dir, body).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}
