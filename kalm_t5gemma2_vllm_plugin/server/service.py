# SPDX-License-Identifier: Apache-2.0
"""The scoring service: owns vLLM's asynchronous engine and the prompt builder.

Every pair of every HTTP request becomes its own engine request; vLLM's
scheduler batches them across clients. Nothing here serialises inference or
blocks the event loop while the engine computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..constants import (
    DEFAULT_INSTRUCTION,
    DEFAULT_SYSTEM_INSTRUCTION,
    SUPPORTED_ENCODER_CHUNK_SIZES,
)
from ..counters import EngineCounters
from ..engine_prompts import PromptBuilder
from ..scores import RankResult, rank_results
from ..settings import EngineSettings
from ..store import PassageStore
from ..validation import check_str
from .errors import APIError

__all__ = ["RankOutcome", "RerankService", "ScoredPairs", "ServiceConfig"]

logger = logging.getLogger(__name__)


@dataclass
class ServiceConfig:
    """Everything ``kalm-vllm-serve`` configures (flags map 1:1)."""

    model: str
    model_path: str
    settings: EngineSettings
    max_model_len: int
    batch_size: int
    dtype: str | None = None
    gpu_memory_utilization: float | None = None
    instruction: str = DEFAULT_INSTRUCTION
    system_instruction: str = DEFAULT_SYSTEM_INSTRUCTION
    served_model_names: list[str] = field(default_factory=list)
    api_key: str | None = None
    max_documents: int = 4096
    max_pairs: int = 4096
    max_body_bytes: int = 32 * 1024 * 1024
    max_concurrent_requests: int = 64
    #: A passage store (kalm-vllm-encode) for documents given by id.
    passage_store: str | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoredPairs:
    margins: list[float]
    truncated: list[int]
    num_tokens: int


@dataclass
class RankOutcome:
    results: list[RankResult]
    truncated: list[int]
    num_tokens: int


class RerankService:
    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.state = "starting"
        self.started_at = time.monotonic()
        self.engine: Any = None
        self.prompts: PromptBuilder | None = None
        self.dtype: str | None = config.dtype
        self._counters: EngineCounters | None = None
        self.store: PassageStore | None = None
        self._counters_at_start: dict[str, int] = {}
        self._in_flight = 0

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
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from ..engine import open_passage_store, prepare_engine

        config = self.config
        if config.passage_store is not None:
            self.store = open_passage_store(
                config.passage_store, config.model_path, config.settings, config.dtype
            )
        setup = prepare_engine(
            config.model_path,
            config.settings,
            instruction=config.instruction,
            system_instruction=config.system_instruction,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            batch_size=config.batch_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            **config.engine_args,
        )
        self.prompts, self._counters = setup.prompts, setup.counters
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**setup.engine_args))
        self.dtype = str(self.engine.model_config.dtype).removeprefix("torch.")
        self._counters_at_start = self._counters.snapshot()

    async def shutdown(self) -> None:
        engine, self.engine = self.engine, None
        if self.state != "failed":
            self.state = "stopped"
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)
        if self._counters is not None:
            self._counters.unlink()
            self._counters = None
        if self.store is not None:
            self.store.close()

    @property
    def ready(self) -> bool:
        return (
            self.state == "ready"
            and self.engine is not None
            and not self.engine.errored
        )

    def health(self) -> dict[str, Any]:
        config, settings = self.config, self.config.settings
        return {
            "status": "ok" if self.ready else self.state,
            "uptime_seconds": round(time.monotonic() - self.started_at, 3),
            "model": config.model,
            "served_model_names": self.model_names(),
            "dtype": self.dtype,
            "query_max_length": settings.query_max_length,
            "document_max_length": settings.document_max_length,
            "encoder_chunk_size": settings.chunk_size,
            "max_model_len": config.max_model_len,
            "passage_store": config.passage_store,
            "passages_in_store": None if self.store is None else len(self.store),
            "decoder_only": settings.decoder_only,
            "batch_size": config.batch_size,
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "supported_encoder_chunk_sizes": list(SUPPORTED_ENCODER_CHUNK_SIZES),
            "requests_in_flight": self._in_flight,
            "limits": {
                "max_documents": config.max_documents,
                "max_pairs": config.max_pairs,
                "max_body_bytes": config.max_body_bytes,
                "max_concurrent_requests": config.max_concurrent_requests,
            },
        }

    def engine_counters(self) -> dict[str, int]:
        if self._counters is None:
            return {}
        now = self._counters.snapshot()
        return {k: now[k] - self._counters_at_start.get(k, 0) for k in now}

    # --- request checks -------------------------------------------------------------
    def model_names(self) -> list[str]:
        names = list(self.config.served_model_names)
        if not names:
            model = self.config.model.rstrip("/")
            names = list(dict.fromkeys([model, model.rsplit("/", 1)[-1]]))
        return names

    def check_model(self, model: str | None) -> None:
        if model and model not in self.model_names():
            raise APIError(
                404,
                "model_not_found",
                f"model {model!r} is not served here; served: {self.model_names()}.",
                field="model",
            )

    def check_count(self, count: int, name: str, limit: int) -> None:
        if count > limit:
            raise APIError(
                413,
                "too_many_items",
                f"{name} has {count} items; this server accepts at most "
                f"{limit} per request.",
                field=name,
            )

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Bound the requests in flight: beyond the limit answer 429, not a queue."""
        if not self.ready:
            raise APIError(503, "unavailable", f"The engine is {self.state}.")
        if self._in_flight >= self.config.max_concurrent_requests:
            raise APIError(
                429,
                "overloaded",
                f"{self._in_flight} requests are in flight (limit "
                f"{self.config.max_concurrent_requests}); retry later.",
                headers={"Retry-After": "1"},
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
    ) -> ScoredPairs:
        assert self.prompts is not None
        if instruction is None:
            instruction = self.config.instruction
        else:
            self.prompts.check_instruction(check_str(instruction, "instruction"))
        try:
            prompts = self.prompts.build(
                list(pairs),
                instruction,
                document_max_length=document_max_length,
                store=self.store,
            )
        except KeyError as exc:  # ids the store does not hold
            raise APIError(
                404, "document_not_found", exc.args[0], field="document_ids"
            ) from None
        margins = await asyncio.gather(*(self._margin(p.prompt) for p in prompts))
        return ScoredPairs(
            margins=list(margins),
            truncated=[i for i, p in enumerate(prompts) if p.truncated],
            num_tokens=sum(p.num_tokens for p in prompts),
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
    ) -> RankOutcome:
        scored = await self.score(
            [(query, d) for d in documents],
            instruction,
            document_max_length=document_max_length,
        )
        return RankOutcome(
            rank_results(scored.margins, top_k=top_k, return_margin=return_margin),
            scored.truncated,
            scored.num_tokens,
        )

    async def _margin(self, prompt: dict[str, Any]) -> float:
        from vllm import PoolingParams
        from vllm.v1.engine.exceptions import EngineDeadError

        params = PoolingParams(task="classify", use_activation=False)
        final = None
        try:
            async for output in self.engine.encode(prompt, params, uuid.uuid4().hex):
                final = output
        except EngineDeadError as exc:
            raise APIError(503, "unavailable", "The engine has died.") from exc
        except ValueError as exc:  # vLLM's input validation
            raise APIError(400, "invalid_request", str(exc)) from exc
        assert final is not None
        margin = float(final.outputs.data.reshape(-1)[0])
        if margin != margin or abs(margin) == float("inf"):
            raise APIError(
                500, "internal_error", "The engine returned a non-finite score."
            )
        return margin
