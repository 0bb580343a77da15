# SPDX-License-Identifier: Apache-2.0
"""The KaLM HTTP service: ``create_app`` builds it, ``kalm-vllm-serve`` runs it.

A stop (``Drain``, started by ``kalm-vllm-serve`` on SIGTERM/SIGINT) keeps the
port open but admits nothing new (JSON 503, ``/health`` 503 "draining"), lets
the requests in flight finish for up to ``shutdown_timeout`` seconds, then cuts
the rest: their engine requests are aborted and each gets a JSON 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
    drain = Drain(service, service.config.shutdown_timeout)

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
    app.state.drain = drain
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(
        _GuardMiddleware,  # type: ignore[arg-type]
        service=service,
        metrics=metrics,
        drain=drain,
    )
    return app


#: Seconds a client is told to wait (Retry-After) when the server is stopping:
#: a restart takes longer than that, a balancer retries elsewhere at once.
_RETRY_AFTER_STOPPING = 5
#: Seconds cut requests get to unwind (engine aborts) before the exit goes on.
_SETTLE_SECONDS = 10.0


class Drain:
    """A bounded graceful stop; ``dropped`` counts the requests it cut."""

    def __init__(self, service: RerankService, timeout: float) -> None:
        self.service = service
        self.timeout = timeout
        self.draining = False
        self.dropped = 0
        self._active: set[asyncio.Task[None]] = set()
        self._cut: asyncio.Future[None] | None = None
        self._cut_now = False
        self._task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    def stop(self) -> None:
        """First call: start draining. Any later one: cut what is left now."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        else:
            self._cut_now = True

    async def guard(self, call: Awaitable[None], responded: Callable[[], bool]) -> bool:
        """Run one request; ``True`` if the drain cut it before it responded
        (then it has been cancelled and the caller answers 503)."""
        task = asyncio.ensure_future(call)
        self._active.add(task)
        try:
            await asyncio.wait(
                {task, self._cut_future()}, return_when=asyncio.FIRST_COMPLETED
            )
            if not task.done() and not responded():
                task.cancel()  # down to vLLM, which aborts the engine requests
                await asyncio.gather(task, return_exceptions=True)
                if not responded():
                    self.dropped += 1
                    return True
            await task  # done, or already sending its answer
            return False
        finally:
            task.cancel()  # no-op once done; else the guard itself was cancelled
            self._active.discard(task)

    def _cut_future(self) -> asyncio.Future[None]:
        if self._cut is None:
            self._cut = asyncio.get_running_loop().create_future()
        return self._cut

    def _busy(self) -> bool:
        return bool(self._active) or self.service.requests_in_flight > 0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self.draining = True
        self.service.begin_drain()
        logger.info(
            "Stopping: %d request(s) in flight get up to %.1f s to finish.",
            self.service.requests_in_flight,
            self.timeout,
        )
        deadline = loop.time() + self.timeout
        while self._busy() and not self._cut_now and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._busy():
            self._cut_future().set_result(None)
            settle = loop.time() + _SETTLE_SECONDS
            while self._busy() and loop.time() < settle:
                await asyncio.sleep(0.05)
            logger.warning(
                "Stopped with %d request(s) cut at the %.1f s shutdown timeout.",
                self.dropped,
                self.timeout,
            )


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
        self, app: Any, service: RerankService, metrics: ServiceMetrics, drain: Drain
    ) -> None:
        self.app = app
        self.service = service
        self.metrics = metrics
        self.drain = drain

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in _ROUTES else "other"
        started = time.perf_counter()
        status = {"code": 0}

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
            call = self.app(scope, self._limited(receive), send_and_record)
            if await self.drain.guard(call, lambda: status["code"] != 0):
                await _send_error(
                    send_and_record,
                    503,
                    "unavailable",
                    f"The server is shutting down; this request did not finish "
                    f"within the {self.drain.timeout:g} s shutdown timeout.",
                )
        finally:
            status["code"] = status["code"] or 500
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
    if status == 503:
        headers.append((b"retry-after", str(_RETRY_AFTER_STOPPING).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
