# SPDX-License-Identifier: Apache-2.0
"""The ASGI layers around the routes, outermost first.

``RequestIdMiddleware`` tags every response (``x-request-id``: the client's,
else a new one); ``JSONCORSMiddleware`` (only with ``--allowed-origins``)
answers browser preflights before any key is asked for; ``GuardMiddleware``
checks the key, the body's size and encoding, drains on shutdown, records
metrics, and answers unexpected errors itself.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from kalm_t5gemma2_vllm_plugin.server.errors import json_error_bytes, unexpected_error
from kalm_t5gemma2_vllm_plugin.server.metrics import ServiceMetrics
from kalm_t5gemma2_vllm_plugin.server.service import RETRY_AFTER_SECONDS, RerankService

if TYPE_CHECKING:
    from kalm_t5gemma2_vllm_plugin.server import Drain

__all__ = ["GuardMiddleware", "JSONCORSMiddleware", "RequestIdMiddleware"]

logger = logging.getLogger(__name__)

#: A client's request id is echoed if it is this short and printable ASCII
#: without spaces; anything else is replaced (it goes into logs and headers).
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")
# RFC 7235: the scheme is case-insensitive and 1*SP separates it.
_BEARER = re.compile(rb"(?i:bearer) +(\S+)")


def request_id(scope: dict) -> str:
    """The id ``RequestIdMiddleware`` gave this request (``""`` outside it)."""
    return str(scope.get("state", {}).get("request_id", ""))


class RequestIdMiddleware:
    """``x-request-id`` on every response: the client's, or a fresh one."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = rid.decode()

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers") or []
                    if k.lower() != b"x-request-id"
                ]
                message = {**message, "headers": [*headers, (b"x-request-id", rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class JSONCORSMiddleware(CORSMiddleware):
    """Starlette's CORS handling; a refused preflight says why in this
    service's JSON error body instead of plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reason = bytes(response.body).decode()
        body = json_error_bytes("cors_rejected", f"CORS preflight refused: {reason}.")
        headers = {
            k: v
            for k, v in response.headers.items()
            if k not in ("content-length", "content-type")
        }
        return Response(
            body,
            status_code=response.status_code,
            headers=headers,
            media_type="application/json",
        )


class GuardMiddleware:
    """Auth, body limits, the drain and per-route metrics, before any route runs.

    A plain ASGI middleware, so that it also covers FastAPI's own routes
    (``/docs``, ``/openapi.json``) and rejects oversize bodies while reading.
    """

    def __init__(
        self,
        app: Any,
        service: RerankService,
        metrics: ServiceMetrics,
        drain: Drain,
        routes: set[str],
    ) -> None:
        self.app = app
        self.service = service
        self.metrics = metrics
        self.drain = drain
        self.routes = routes  # metrics label these; any other path is "other"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.routes else "other"
        started = time.perf_counter()
        sent = {"status": 0, "complete": False}

        async def send_and_record(message: dict) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                sent["complete"] = not message.get("more_body", False)
            await send(message)

        try:
            error = self._reject(scope, path)
            if error is not None:
                await send_error(send_and_record, *error)
                return
            if scope["method"] == "POST":
                scope = _as_json(scope)
            call = self._answer(scope, receive, send_and_record, sent)
            if await self.drain.guard(call, lambda: sent["status"] != 0):
                await send_error(
                    send_and_record,
                    503,
                    "unavailable",
                    f"The server is shutting down; this request did not finish "
                    f"within the {self.drain.timeout:g} s shutdown timeout.",
                )
        finally:
            sent["status"] = sent["status"] or 500
            if route != "/metrics":
                self.metrics.observe(
                    route, sent["status"], time.perf_counter() - started
                )

    async def _answer(self, scope: dict, receive: Any, send: Any, sent: dict) -> None:
        """Run the app. An unexpected error becomes a JSON 500 here rather than
        propagating: raised to uvicorn, it would close a keep-alive connection
        and silently drop the client's next (pipelined) request."""
        try:
            await self.app(scope, self._limited(receive), send)
        except Exception:
            logger.exception(
                "Unhandled error on %s %s (x-request-id %s)",
                scope["method"],
                scope["path"],
                request_id(scope),
            )
            if sent["status"] == 0:
                error = unexpected_error()
                await send_error(send, error.status, error.type, error.message)
            elif not sent["complete"]:
                raise  # half an answer: only closing the connection can say so

    def _reject(self, scope: dict, path: str) -> tuple[int, str, str] | None:
        headers = dict(scope.get("headers") or [])
        key = self.service.config.api_key
        if key and path != "/health" and not _authorized(headers, key):
            return (
                401,
                "unauthorized",
                "A valid 'Authorization: Bearer <key>' header is required.",
            )
        limit = self.service.config.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return (
                413,
                "payload_too_large",
                f"The request body ({int(length)} bytes) exceeds {limit} bytes.",
            )
        coding = headers.get(b"content-encoding", b"identity").strip().lower()
        if coding not in (b"", b"identity"):
            return (
                415,
                "unsupported_media_type",
                f"Content-Encoding {coding.decode('latin-1')!r} is not supported; "
                f"send the body uncompressed.",
            )
        if self.drain.draining and path not in ("/health", "/metrics"):
            return 503, "unavailable", "The server is shutting down; retry elsewhere."
        return None

    def _limited(self, receive: Any) -> Any:
        """Count body bytes as they arrive (covers chunked uploads); FastAPI
        passes the HTTPException through to the error handlers."""
        limit = self.service.config.max_body_bytes
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"The request body exceeds {limit} bytes.")
            return message  # type: ignore[no-any-return]

        return limited_receive


def _authorized(headers: dict[bytes, bytes], key: str) -> bool:
    given = _BEARER.fullmatch(headers.get(b"authorization", b""))
    return secrets.compare_digest(given.group(1) if given else b"", key.encode())


def _as_json(scope: dict) -> dict:
    """Every POST body here is JSON: read it as JSON even when a client (say,
    ``curl -d``) labels it otherwise."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    given = dict(scope["headers"]).get(b"content-type", b"")
    if b"json" in given:
        return scope
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


async def send_error(send: Any, status: int, type_: str, message: str) -> None:
    body = json_error_bytes(type_, message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if status == 503:
        headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
