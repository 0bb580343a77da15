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
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI

from kalm_t5gemma2_vllm_plugin import __version__
from kalm_t5gemma2_vllm_plugin.server.errors import install_error_handlers
from kalm_t5gemma2_vllm_plugin.server.metrics import ServiceMetrics
from kalm_t5gemma2_vllm_plugin.server.middleware import (
    GuardMiddleware,
    JSONCORSMiddleware,
    RequestIdMiddleware,
)
from kalm_t5gemma2_vllm_plugin.server.openapi import install_openapi
from kalm_t5gemma2_vllm_plugin.server.routes import router
from kalm_t5gemma2_vllm_plugin.server.service import RerankService, ServiceConfig
from kalm_t5gemma2_vllm_plugin.server.tei import router as tei_router

__all__ = ["ServiceConfig", "create_app"]

logger = logging.getLogger(__name__)
#: Routes metrics are labelled by; any other path counts as "other".
_ROUTES = {
    "/health",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/score",
    "/v1/models",
    "/metrics",
    "/info",
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
    app.include_router(tei_router)
    install_openapi(app, keyed=bool(service.config.api_key))
    # add_middleware wraps what is there: the last added runs first.
    app.add_middleware(
        GuardMiddleware,  # type: ignore[arg-type]
        service=service,
        metrics=metrics,
        drain=drain,
        routes=_ROUTES,
    )
    if service.config.allowed_origins:
        # Outside the guard: a browser's preflight carries no key.
        app.add_middleware(
            JSONCORSMiddleware,  # type: ignore[arg-type]
            allow_origins=service.config.allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id"],
            expose_headers=["x-request-id", "retry-after"],
            max_age=600,
        )
    app.add_middleware(RequestIdMiddleware)  # type: ignore[arg-type]
    return app


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
