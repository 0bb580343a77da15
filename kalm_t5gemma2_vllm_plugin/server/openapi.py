# SPDX-License-Identifier: Apache-2.0
"""The OpenAPI document says what the service really answers.

FastAPI documents only 200 and its own 422 body (``HTTPValidationError``),
which this service never sends. Here every operation also lists the errors it
can give, each with the one error body (``schemas.ErrorResponse``), ``/metrics``
is Prometheus text, and the bearer scheme is declared when a key is required
(only then: a document that asked for a key the server does not check would
be as wrong as one that hides it).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from kalm_t5gemma2_vllm_plugin.server.schemas import ErrorResponse

__all__ = ["install_openapi"]

_SCHEME = "bearerAuth"
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_REQUEST_ERRORS = {
    "400": "Malformed JSON, a body that is not an object, or a refused value",
    "404": "Unknown model or document id",
    "413": "Body, documents, pairs or tokens over a limit",
    "415": "A compressed body (Content-Encoding)",
    "422": "A field of the wrong type, or missing",
    "429": "Too many requests in flight (see Retry-After)",
}
_ALWAYS = {
    "500": "Internal error (details in the server log)",
    "503": "Starting, draining or engine unavailable (see Retry-After)",
}
_UNAUTHORIZED = {"401": "Missing or wrong 'Authorization: Bearer <key>'"}
_OPEN = {"/health"}  # the one route that needs no key


def install_openapi(app: FastAPI, *, keyed: bool) -> None:
    """Serve ``document(...)`` of the app's routes as ``/openapi.json``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = document(schema, keyed=keyed)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document(schema: dict[str, Any], *, keyed: bool) -> dict[str, Any]:
    """``schema`` (FastAPI's) with the error responses and the security scheme."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    error = ErrorResponse.model_json_schema(
        ref_template="#/components/schemas/{model}", mode="serialization"
    )
    schemas.update(error.pop("$defs", {}))
    schemas["ErrorResponse"] = error
    if keyed:
        components["securitySchemes"] = {_SCHEME: {"type": "http", "scheme": "bearer"}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            _document_operation(path, method, operation, keyed=keyed)
    for name in ("HTTPValidationError", "ValidationError"):  # if now unused
        if f'/schemas/{name}"' not in json.dumps(schema):
            schemas.pop(name, None)
    return schema


def _document_operation(
    path: str, method: str, operation: dict[str, Any], *, keyed: bool
) -> None:
    responses = operation.setdefault("responses", {})
    errors = dict(_ALWAYS)
    if path in _OPEN:  # not ready: the same report as when ready
        errors.pop("503")
        responses["503"] = {
            "description": "Not ready: starting, draining or failed",
            "content": responses["200"]["content"],
        }
    if method == "post":
        errors.update(_REQUEST_ERRORS)
    if keyed and path not in _OPEN:
        errors.update(_UNAUTHORIZED)
        operation["security"] = [{_SCHEME: []}]
    for status, description in sorted(errors.items()):
        ours = {"content": {"application/json": {"schema": _ERROR_REF}}}
        given = responses.get(status)
        if given is None or _is_fastapi_validation(given):
            responses[status] = {"description": description, **ours}
    if path == "/metrics":
        responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}


def _is_fastapi_validation(response: dict[str, Any]) -> bool:
    content = response.get("content", {}).get("application/json", {})
    return bool(
        content.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError")
    )
