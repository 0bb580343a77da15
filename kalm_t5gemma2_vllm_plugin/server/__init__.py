# SPDX-License-Identifier: Apache-2.0
"""The KaLM HTTP service: ``create_app`` builds it, ``kalm-vllm-serve`` runs it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException

from kalm_t5gemma2_vllm_plugin import __version__
from kalm_t5gemma2_vllm_plugin.server.errors import (
    install_error_handlers,
    json_error_bytes,
)
from kalm_t5gemma2_vllm_plugin.server.metrics import ServiceMetrics
from kalm_t5gemma2_vllm_plugin.server.routes import router
from kalm_t5gemma2_vllm_plugin.server.service import RerankService, ServiceConfig

__all__ = ["ServiceConfig", "create_app"]

logger = logging.getLogger(__name__)
_ROUTES = {
    "/health",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/score",
    "/metrics",
    "/docs",
    "/openapi.json",
}


def create_app(config: ServiceConfig, service: RerankService | None = None) -> FastAPI:
    """The FastAPI app; the engine starts in the background once the app starts.

    Example:
        >>> config = ServiceConfig(EngineOptions(model="m", model_path="/ckpt"))
        >>> app = create_app(config)
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    service = service or RerankService(config)
    metrics = ServiceMetrics(service.engine_counters)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # /health answers 503 while the engine loads, so start it in the background.
        starting = asyncio.create_task(_start(service, app))
        try:
            yield
        finally:
            starting.cancel()
            await service.shutdown()

    app = FastAPI(
        title="KaLM vLLM Online Reranker", version=__version__, lifespan=lifespan
    )
    app.state.service = service
    app.state.metrics = metrics
    app.state.start_failed = False
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(_GuardMiddleware, service=service, metrics=metrics)  # type: ignore[arg-type]
    return app


async def _start(service: RerankService, app: FastAPI) -> None:
    try:
        await service.start()
    except asyncio.CancelledError:
        raise
    except BaseException:
        logger.exception("The engine failed to start; shutting the server down.")
        app.state.start_failed = True
        stop = getattr(app.state, "request_shutdown", None)
        if stop is not None:
            stop()


class _GuardMiddleware:
    """Auth, body-size limit and per-route metrics, before any route runs.

    A plain ASGI middleware, so that it also covers FastAPI's own routes
    (``/docs``, ``/openapi.json``) and rejects oversize bodies while reading.
    """

    def __init__(
        self, app: Any, service: RerankService, metrics: ServiceMetrics
    ) -> None:
        self.app = app
        self.service = service
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in _ROUTES else "other"
        started = time.perf_counter()
        status = {"code": 500}

        async def send_and_record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            error = self._reject(scope, path)
            if error is not None:
                await _send_error(send_and_record, *error)
                return
            if scope["method"] == "POST":
                scope = _as_json(scope)
            await self.app(scope, self._limited(receive), send_and_record)
        finally:
            if route != "/metrics":
                self.metrics.observe(
                    route, status["code"], time.perf_counter() - started
                )

    def _reject(self, scope: dict, path: str) -> tuple[int, str, str] | None:
        headers = dict(scope.get("headers") or [])
        key = self.service.config.api_key
        if key and path != "/health":
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return (
                    401,
                    "unauthorized",
                    "A valid 'Authorization: Bearer <key>' header is required.",
                )
        length = headers.get(b"content-length")
        if (
            length is not None
            and length.isdigit()
            and int(length) > self.service.config.max_body_bytes
        ):
            return (
                413,
                "payload_too_large",
                (
                    f"The request body ({int(length)} bytes) exceeds "
                    f"{self.service.config.max_body_bytes} bytes."
                ),
            )
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


def _as_json(scope: dict) -> dict:
    """Every POST body here is JSON: read it as JSON even when a client (say,
    ``curl -d``) labels it otherwise."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    given = dict(scope["headers"]).get(b"content-type", b"")
    if b"json" in given:
        return scope
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


async def _send_error(send: Any, status: int, type_: str, message: str) -> None:
    body = json_error_bytes(type_, message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
