# SPDX-License-Identifier: Apache-2.0
"""The scoring service: owns vLLM's asynchronous engine and the prompt builder.

Every pair of every HTTP request becomes its own engine request; vLLM's
scheduler batches them across clients. Nothing here serialises inference or
blocks the event loop: the engine computes in its own process, and requests
are tokenized in a small thread pool (the tokenizer releases the GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kalm_t5gemma2_vllm_plugin import errors
from kalm_t5gemma2_vllm_plugin.constants import SUPPORTED_ENCODER_CHUNK_SIZES
from kalm_t5gemma2_vllm_plugin.engine.requests import DocumentId, EnginePrompt
from kalm_t5gemma2_vllm_plugin.engine.session import EngineOptions, EngineSession
from kalm_t5gemma2_vllm_plugin.engine.vllm_compat import (
    async_engine_classes,
    margin_from_encode,
    request_failure,
)
from kalm_t5gemma2_vllm_plugin.mep import pooled_length
from kalm_t5gemma2_vllm_plugin.scores import RankResult, rank_results
from kalm_t5gemma2_vllm_plugin.validation import check_request_chunk_size
from kalm_t5gemma2_vllm_plugin.windows import (
    DEFAULT_MAX_WINDOWS,
    WindowPlan,
    check_window_overlap,
)

__all__ = [
    "RETRY_AFTER_SECONDS",
    "PassageOptions",
    "RankOutcome",
    "RerankService",
    "ScoredPairs",
    "ServiceConfig",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Retry-After (seconds) on a 503 while the engine starts or the server drains:
#: long enough not to hammer a loading engine, short enough for a balancer.
RETRY_AFTER_SECONDS = 5


@dataclass
class ServiceConfig:
    """Everything ``kalm-vllm-serve`` configures (flags map 1:1)."""

    engine: EngineOptions
    served_model_names: list[str] = field(default_factory=list)
    api_key: str | None = None
    max_documents: int = 4096
    max_pairs: int = 4096
    #: Windows one long document may have (``long_document`` max/mean); each
    #: window counts as a pair against ``max_pairs``.
    max_windows_per_document: int = DEFAULT_MAX_WINDOWS
    max_body_bytes: int = 32 * 1024 * 1024
    max_concurrent_requests: int = 64
    #: Tokens per request (usage.prompt_tokens); ``None``: what the other
    #: limits admit, ``RerankService.max_request_tokens``.
    max_request_tokens: int | None = None
    #: Seconds in-flight requests may finish in after SIGTERM/SIGINT.
    shutdown_timeout: float = 30.0
    #: Browser origins allowed by CORS (``["*"]``: any); empty: CORS off.
    allowed_origins: list[str] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.engine.model


@dataclass
class ScoredPairs:
    margins: list[float]
    truncated: list[int]
    num_tokens: int
    #: Under a window policy: ``(windows, best span)`` per pair.
    windows: list[tuple[int, tuple[int, int]]] | None = None


@dataclass
class RankOutcome:
    results: list[RankResult]
    truncated: list[int]
    num_tokens: int
    windows: list[tuple[int, tuple[int, int]]] | None = None


@dataclass(frozen=True)
class PassageOptions:
    """How a request reads its documents (``schemas._PassageOptions``)."""

    long_document: str = "truncate"
    window_overlap: int | None = None
    encoder_chunk_size: int | None = None


class _Builders:
    """Threads that build requests (tokenize) off the event loop, ``size`` at
    most at a time; a slot is freed when its thread ends, not when its request
    is cancelled, so clients that leave cannot pile up tokenizing threads.
    Daemon threads: a build whose request was cut must not hold up the exit
    (``ThreadPoolExecutor`` joins its threads at interpreter exit)."""

    def __init__(self, size: int) -> None:
        self._slots = asyncio.Semaphore(size)

    async def run(self, work: Callable[[], T]) -> T:
        await self._slots.acquire()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def thread() -> None:
            try:
                outcome: tuple[Any, BaseException | None] = (work(), None)
            except BaseException as exc:  # handed to the awaiting request
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # the loop is gone: exiting
                loop.call_soon_threadsafe(self._finish, future, *outcome)

        try:
            threading.Thread(target=thread, name="kalm-build", daemon=True).start()
        except BaseException:
            self._slots.release()
            raise
        return await future

    def _finish(
        self, future: asyncio.Future[Any], result: Any, error: BaseException | None
    ) -> None:
        self._slots.release()
        if future.done():  # its request was cancelled
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _public_name(model: str) -> str:
    """A model as a client may see it: a local directory by its name only."""
    return Path(model).name if Path(model).expanduser().is_dir() else model


class RerankService:
    """``EngineSession`` + ``AsyncLLM.encode``: one engine request per pair."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.state = "starting"
        self.started_at = time.monotonic()
        self.created = int(time.time())
        self.session: EngineSession | None = None
        self._in_flight = 0
        # Two or more, so that one huge request never holds up a small one.
        self._builders = _Builders(max(2, min(8, os.cpu_count() or 2)))

    # --- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Build the tokenizer and the engine (in a thread: the loop keeps serving)."""
        try:
            await asyncio.to_thread(self._start_engine)
        except BaseException:
            self.state = "failed"
            raise
        self.state = "ready"
        logger.info("KaLM engine ready (%s, dtype %s)", self.config.model, self.dtype)

    def _start_engine(self) -> None:
        engine_args_cls, async_llm, _ = async_engine_classes()
        session = EngineSession(self.config.engine)
        session.start(
            lambda args: async_llm.from_engine_args(engine_args_cls(**args)),
            lambda engine: engine.shutdown(),
        )
        self.session = session

    def begin_drain(self) -> None:
        """Stop: /health says so and no new request is admitted."""
        if self.state == "ready":
            self.state = "draining"

    async def shutdown(self) -> None:
        session, self.session = self.session, None
        if self.state != "failed":
            self.state = "stopped"
        if session is not None:
            await asyncio.to_thread(session.close)

    @property
    def dtype(self) -> str | None:
        return self.config.engine.dtype if self.session is None else self.session.dtype

    @property
    def requests_in_flight(self) -> int:
        return self._in_flight

    @property
    def max_request_tokens(self) -> int | None:
        """The per-request token limit: the configured one, else the most that
        ``max_documents``/``max_pairs`` full-length pairs need (so the default
        refuses no request the other limits admit; lower it to bound cost)."""
        if self.config.max_request_tokens is not None or self.session is None:
            return self.config.max_request_tokens
        settings, sizes = self.session.settings, self.session.sizes
        rows = pooled_length(settings.document_max_length, settings.pool_factor)
        # max_model_len bounds the decoder ids of any admitted pair.
        per_pair = sizes.max_model_len - rows + settings.document_max_length
        return max(self.config.max_documents, self.config.max_pairs) * per_pair

    @property
    def max_model_len(self) -> int | None:
        """The engine's (once started), else the configured one, if any."""
        if self.session is None:
            return self.config.engine.max_model_len
        return self.session.sizes.max_model_len

    @property
    def retry_after(self) -> int | None:
        """Seconds a refused client should wait, when waiting helps."""
        return RETRY_AFTER_SECONDS if self.state in ("starting", "draining") else None

    @property
    def ready(self) -> bool:
        return (
            self.state == "ready"
            and self.session is not None
            and self.session.engine is not None
            and not self.session.engine.errored
        )

    def health(self) -> dict[str, Any]:
        config, options = self.config, self.config.engine
        settings = options.settings
        store = None if self.session is None else self.session.store
        return {
            "status": "ok" if self.ready else self.state,
            "uptime_seconds": round(time.monotonic() - self.started_at, 3),
            # /health needs no key: no path of this machine in it (F14).
            "model": _public_name(config.model),
            "served_model_names": list(
                dict.fromkeys(_public_name(n) for n in self.model_names())
            ),
            "dtype": self.dtype,
            "query_max_length": settings.query_max_length,
            "document_max_length": settings.document_max_length,
            "encoder_chunk_size": settings.chunk_size,
            "max_model_len": self.max_model_len,
            "max_num_batched_tokens": (
                options.max_num_batched_tokens
                if self.session is None
                else self.session.sizes.max_num_batched_tokens
            ),
            "passage_store": (
                None
                if options.passage_store is None
                else Path(options.passage_store).name
            ),
            "passages_in_store": None if store is None else len(store),
            "decoder_only": settings.decoder_only,
            "batch_size": options.batch_size,
            "gpu_memory_utilization": options.gpu_memory_utilization,
            "supported_encoder_chunk_sizes": list(SUPPORTED_ENCODER_CHUNK_SIZES),
            "passage_cache": self._passage_cache(),
            "requests_in_flight": self._in_flight,
            "limits": {
                "max_documents": config.max_documents,
                "max_pairs": config.max_pairs,
                "max_windows_per_document": config.max_windows_per_document,
                "max_body_bytes": config.max_body_bytes,
                "max_concurrent_requests": config.max_concurrent_requests,
                "max_request_tokens": self.max_request_tokens,
                "shutdown_timeout": config.shutdown_timeout,
            },
        }

    def _passage_cache(self) -> dict[str, Any]:
        stats = self.engine_counters()
        return {
            "capacity_mb": self.config.engine.settings.passage_cache_mb,
            "bytes": stats.get("passage_cache_bytes", 0),
            "hits": stats.get("passage_cache_hits", 0),
            "misses": stats.get("passage_cache_misses", 0),
            "evictions": stats.get("passage_cache_evictions", 0),
        }

    def engine_counters(self) -> dict[str, int]:
        return {} if self.session is None else self.session.stats()

    # --- request checks -------------------------------------------------------------
    def model_names(self) -> list[str]:
        names = list(self.config.served_model_names)
        if not names:
            model = self.config.model.rstrip("/")
            names = list(dict.fromkeys([model, model.rsplit("/", 1)[-1]]))
        return names

    def listed_model_names(self) -> list[str]:
        """What ``GET /v1/models`` lists: the served names, but a local
        checkpoint directory by its last component (also served) only."""
        if self.config.served_model_names:
            return list(self.config.served_model_names)
        return [_public_name(self.config.model.rstrip("/"))]

    def check_model(self, model: str | None) -> None:
        if model and model not in self.model_names():
            raise errors.UnknownModelError(
                f"model {model!r} is not served here; served: {self.model_names()}.",
                field="model",
            )

    def check_count(self, count: int, name: str, limit: int) -> None:
        if count > limit:
            raise errors.TooManyItemsError(
                f"{name} has {count} items; this server accepts at most "
                f"{limit} per request.",
                field=name,
            )

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Bound the requests in flight: beyond the limit answer 429, not a queue."""
        if not self.ready:
            raise errors.EngineUnavailableError(
                f"The engine is {self.state}.", retry_after=self.retry_after
            )
        if self._in_flight >= self.config.max_concurrent_requests:
            raise errors.OverloadedError(
                f"{self._in_flight} requests are in flight (limit "
                f"{self.config.max_concurrent_requests}); retry later."
            )
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    # --- scoring --------------------------------------------------------------------
    async def score(
        self,
        pairs: Sequence[tuple[str, str]],
        instruction: str | None,
        *,
        document_max_length: int | None = None,
        field: str = "pairs",
        options: PassageOptions = PassageOptions(),
    ) -> ScoredPairs:
        session = self._session()
        chunk = check_request_chunk_size(
            options.encoder_chunk_size, session.settings.chunk_size
        )
        # Tokenizing (megabytes, at worst) runs off the event loop.
        build = functools.partial(
            self._build,
            session,
            list(pairs),
            instruction,
            options,
            document_max_length=document_max_length,
            max_tokens=self.max_request_tokens,
            field=field,
            chunk_size=chunk,
        )
        try:
            plan, prompts = await self._builders.run(build)
        except errors.UnknownDocumentError as exc:
            exc.field = _unknown_id_field(pairs, exc.ids, field)
            raise
        pending = [asyncio.ensure_future(self._margin(p.prompt)) for p in prompts]
        try:
            margins = await asyncio.gather(*pending)
        except BaseException:  # one pair failed: the others need not be scored
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        cut = [i for i, p in enumerate(prompts) if p.truncated]
        tokens = sum(p.num_tokens for p in prompts)
        if plan is None:
            return ScoredPairs(list(margins), cut, tokens)
        owner = [n for n, group in enumerate(plan.groups) for _ in group]
        scores = plan.combine(margins)
        return ScoredPairs(
            margins=[s.margin for s in scores],
            truncated=sorted({owner[i] for i in cut}),
            num_tokens=tokens,
            windows=[(s.windows, s.best_window) for s in scores],
        )

    async def rank(
        self,
        query: str,
        documents: Sequence[str],
        instruction: str | None,
        *,
        top_k: int | None,
        return_margin: bool,
        document_max_length: int | None = None,
        options: PassageOptions = PassageOptions(),
    ) -> RankOutcome:
        scored = await self.score(
            [(query, d) for d in documents],
            instruction,
            document_max_length=document_max_length,
            field="documents",
            options=options,
        )
        return RankOutcome(
            rank_results(
                scored.margins,
                top_k=top_k,
                return_margin=return_margin,
                windows=scored.windows,
            ),
            scored.truncated,
            scored.num_tokens,
            scored.windows,
        )

    def _build(
        self,
        session: EngineSession,
        pairs: list[tuple[str, str]],
        instruction: str | None,
        options: PassageOptions,
        *,
        document_max_length: int | None,
        field: str,
        **build: Any,
    ) -> tuple[WindowPlan | None, list[EnginePrompt]]:
        """Engine requests (in a builder thread): one per pair, or one per
        window under a window policy (each window counts against max_pairs)."""
        instruction = session.instruction(instruction)
        if options.long_document == "truncate":
            prompts = session.build(
                pairs,
                instruction,
                document_max_length=document_max_length,
                field=field,
                **build,
            )
            return None, prompts
        plan = session.requests.plan_windows(
            pairs,
            options.long_document,
            overlap=check_window_overlap(options.window_overlap),
            max_windows=self.config.max_windows_per_document,
            store=session.store,
            document_max_length=document_max_length,
            field=(
                (lambda i: f"pairs.{i}.document")
                if field == "pairs"
                else (lambda i: f"{field}.{i}")
            ),
        )
        if len(plan.pairs) > self.config.max_pairs:
            raise errors.TooManyItemsError(
                f"{field}: the documents make {len(plan.pairs)} windows; this "
                f"server scores at most {self.config.max_pairs} pairs per request "
                f"(max_pairs; each window is a pair).",
                field=field,
            )
        prompts = session.build(
            plan.pairs,
            instruction,
            document_max_length=document_max_length,
            field=field,
            **build,
        )
        return plan, prompts

    def _session(self) -> EngineSession:
        if self.session is None:
            raise errors.EngineUnavailableError(f"The engine is {self.state}.")
        return self.session

    async def _margin(self, prompt: dict[str, Any]) -> float:
        from vllm import PoolingParams

        _, _, engine_dead = async_engine_classes()
        engine = self._session().engine
        params = PoolingParams(task="classify", use_activation=False)
        final = None
        try:
            async for output in engine.encode(prompt, params, uuid.uuid4().hex):
                final = output
        except engine_dead as exc:
            raise errors.EngineUnavailableError("The engine has died.") from exc
        except Exception as exc:
            # vLLM wraps most input errors (its own and the processor's) in
            # EngineGenerateError: the root cause says whose fault it is.
            raise request_failure(exc) from exc
        assert final is not None
        return margin_from_encode(final)


def _unknown_id_field(
    pairs: Sequence[tuple[str, str]], unknown: list[str], field: str
) -> str:
    """The JSON path of the first unknown id: ``pairs.N.document_id`` on
    ``/score``, ``document_ids.N`` on the rerank routes (ids follow texts)."""
    ids = [(i, d) for i, (_, d) in enumerate(pairs) if isinstance(d, DocumentId)]
    found = [(n, i) for n, (i, d) in enumerate(ids) if d in unknown]
    if not found:
        return "document_ids"
    n, index = found[0]
    return f"pairs.{index}.document_id" if field == "pairs" else f"document_ids.{n}"
