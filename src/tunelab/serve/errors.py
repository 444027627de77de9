"""OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}`` on every failure.

The ``openai`` client retries 408, 409, 429 and 5xx responses twice by default, so an error that
would happen again (a bad field, an unknown id, a finished job) must never use those statuses: a
retried ``POST /fine_tuning/jobs`` after a 5xx could create the job twice. Request-validation
failures are 400 here, not FastAPI's 422 with its own body.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An error the client sees as ``status`` with OpenAI's envelope."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return envelope(self.message, self.type, self.param, self.code)


def envelope(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def not_found(kind: str, ident: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(404, f"No {kind} found with id '{ident}'.", param=param, code=code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


#: Routes answering in Cohere's shape (``tunelab.serve.cohere``): their errors are ``{"message": ...}``.
COHERE_PATHS = frozenset({"/v2/chat", "/v2/embed", "/v1/embed", "/v2/rerank", "/v1/rerank", "/v1/classify"})


def _response(request: Request, body: dict[str, Any], status: int) -> JSONResponse:
    """OpenAI's envelope, or Cohere's ``{"message": ...}`` on Cohere's routes."""
    if request.url.path in COHERE_PATHS:
        body = {"message": body["error"]["message"]}
    return JSONResponse(body, status_code=status)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return _response(request, exc.body(), exc.status)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 becomes 400 with the envelope; ``param`` names the first offending field."""
    assert isinstance(exc, RequestValidationError)
    errors = jsonable_encoder(exc.errors())
    first = errors[0] if errors else {}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "form")]
    param = ".".join(location) or None
    message = f"Invalid value for '{param}': {first.get('msg', 'invalid request')}" if param else str(first.get("msg", "invalid request"))
    return _response(request, envelope(message, param=param), 400)


async def http_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method) in the envelope too."""
    assert isinstance(exc, StarletteHTTPException)
    status = 400 if exc.status_code in (409, 422) else exc.status_code
    return JSONResponse(envelope(str(exc.detail)), status_code=status)


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A bug is still answered in the envelope (500, ``server_error``), so the client can read it."""
    return _response(request, envelope(f"The server had an error while processing your request: {type(exc).__name__}: {exc}",
                                       type="server_error"), 500)
