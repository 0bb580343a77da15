# SPDX-License-Identifier: Apache-2.0
"""Every error the service returns, mapped in one place to one JSON shape.

Body: ``{"error": {"type", "message", "field"?}, "detail": message}`` (the
top-level ``detail`` for Jina-style clients, which read only that). Client
faults are 4xx with a message naming the field; anything unexpected is a 500
with a generic message (details go to the log, never to the client). The same
body comes from the routes, the middleware (``json_error_bytes``) and the HTTP
protocol layer (``server/protocol.py``).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kalm_t5gemma2_vllm_plugin import errors

__all__ = [
    "APIError",
    "api_error",
    "error_body",
    "install_error_handlers",
    "json_error_bytes",
    "unexpected_error",
]

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status, raised anywhere in the request path."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.field = field
        self.headers = headers


#: The package's errors -> (status, type), most specific first.
_STATUS: list[tuple[type[errors.KaLMError], int, str]] = [
    (errors.UnknownDocumentError, 404, "document_not_found"),
    (errors.UnknownModelError, 404, "model_not_found"),
    (errors.TooManyItemsError, 413, "too_many_items"),
    (errors.KaLMInputError, 400, "invalid_request"),
    (errors.EngineUnavailableError, 503, "unavailable"),
    (errors.OverloadedError, 429, "overloaded"),
    (errors.CorruptStoreError, 500, "corrupt_store"),  # names only, never a path
]


def api_error(exc: errors.KaLMError) -> APIError:
    """The HTTP face of one of the package's errors."""
    for kind, status, type_ in _STATUS:
        if isinstance(exc, kind):
            retry_after = getattr(exc, "retry_after", None)
            headers = None if retry_after is None else {"Retry-After": str(retry_after)}
            field = getattr(exc, "field", None)
            if status >= 500:  # the operator must hear of it, not only the client
                logger.error("%s: %s", type_, exc)
            return APIError(status, type_, str(exc), field=field, headers=headers)
    # Engine and configuration faults: a generic message, the details (with
    # the cause chain) in the log.
    logger.error("Engine error: %s", exc, exc_info=exc)
    message = "The engine returned an unusable result."
    if not isinstance(exc, errors.KaLMEngineError):
        message = "Internal server error."
    return APIError(500, "internal_error", message)


def error_body(type_: str, message: str, field: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type_, "message": message}
    if field is not None:
        error["field"] = field
    return {"error": error, "detail": message}


def unexpected_error() -> APIError:
    """The 500 for a fault nobody foresaw (its traceback goes to the log)."""
    return APIError(500, "internal_error", "Internal server error.")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(error.type, error.message, error.field),
        status_code=error.status,
        headers=error.headers,
    )


# Pydantic names the branch of a union in the location; clients need the field.
_UNION_BRANCHES = {"str", "DocumentObject"}
# What a union branch reports when the value is of another shape than it takes.
_BRANCH_MISMATCH = {
    "string_type",
    "model_type",
    "model_attributes_type",
    "dict_type",
    "missing",
}


def _location(problem: Any) -> tuple[str | None, str | None]:
    """``(field, union)``: the field as clients name it (``documents.1``,
    ``pairs.0.query``), and the union the problem sits in, if any."""
    raw = [str(p) for p in problem.get("loc", ()) if p != "body"]
    loc = [p for p in raw if p not in _UNION_BRANCHES]
    branch = next((i for i, p in enumerate(raw) if p in _UNION_BRANCHES), None)
    union = ".".join(raw[:branch]) if branch is not None else None
    return ".".join(loc) or None, union


def _reported(problems: list[Any]) -> Any:
    """The problem to report: the first, unless it only says that a union's
    value is not of one branch's type while another branch found the real fault
    (``{"text": "\\ud800"}`` is no string, and its text is not valid Unicode)."""
    first = problems[0]
    _, union = _location(first)
    if union is None or first.get("type") not in _BRANCH_MISMATCH:
        return first
    for problem in problems:
        if _location(problem)[1] == union and problem.get("type") not in (
            _BRANCH_MISMATCH
        ):
            return problem
    return first


def _validation_error(exc: RequestValidationError) -> APIError:
    problems = list(exc.errors())
    first = _reported(problems)
    field, union = _location(first)
    if union is not None and first.get("type") in _BRANCH_MISMATCH:
        return APIError(
            422,
            "invalid_request",
            f"{field}: a document must be a string or an object with a 'text' string.",
            field=field,
        )
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error") or first.get("msg")
        at = [p for p in first.get("loc", ()) if isinstance(p, int)]
        where = f" at character {at[0]}" if at else ""
        return APIError(
            400, "invalid_json", f"The request body is not valid JSON: {reason}{where}."
        )
    if not field and first.get("type") == "missing":
        return APIError(
            400, "invalid_json", "The request body is empty; send a JSON object."
        )
    if not field and first.get("type") in ("model_attributes_type", "dict_type"):
        return APIError(
            400, "invalid_request", "The request body must be a JSON object."
        )
    message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
    # Both branches of a union report the same value: count it once.
    others = {u or f for f, u in map(_location, problems)}
    if len(others) > 1:
        message += f" (and {len(others) - 1} more problem(s))"
    return APIError(422, "invalid_request", message, field=field)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(errors.KaLMError)
    async def _kalm(request: Request, exc: errors.KaLMError) -> JSONResponse:
        return error_response(api_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(_http_error(request, exc))

    # A backstop only: the guard middleware (server/middleware.py) answers
    # unexpected errors itself, so that they do not end the connection.
    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unhandled error on %s %s", request.method, request.url.path)
        return error_response(unexpected_error())


def _http_error(request: Request, exc: StarletteHTTPException) -> APIError:
    """Starlette's and FastAPI's own errors, said in this service's words."""
    status, headers = exc.status_code, getattr(exc, "headers", None)
    method, path = request.method, request.url.path
    if status == 404:
        return APIError(404, "not_found", f"No route {path}; see /docs.")
    if status == 405:
        allowed = (headers or {}).get("Allow", "")
        return APIError(
            405,
            "method_not_allowed",
            f"{method} is not allowed on {path} (allowed: {allowed}).",
            headers=headers,
        )
    if status == 413:
        return APIError(413, "payload_too_large", str(exc.detail), headers=headers)
    if status == 400 and exc.__cause__ is not None:  # FastAPI could not parse it
        return APIError(400, "invalid_json", _unparsable_body(exc.__cause__))
    return APIError(status, "http_error", str(exc.detail), headers=headers)


def _unparsable_body(cause: BaseException) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"The request body is not valid UTF-8 JSON (byte 0x"
            f"{cause.object[cause.start]:02X} at offset {cause.start}: {cause.reason})."
        )
    if isinstance(cause, RecursionError):
        return "The request body is nested too deeply to read."
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return (
            f"The request body holds a number of more than "
            f"{sys.get_int_max_str_digits()} digits."
        )
    return "The request body could not be read as JSON."


def json_error_bytes(status_type: str, message: str, field: str | None = None) -> bytes:
    """A ready-encoded error body for the ASGI middleware and the protocol
    layer (no FastAPI involved)."""
    body = error_body(status_type, message, field)
    return json.dumps(body, separators=(",", ":")).encode()
