# SPDX-License-Identifier: Apache-2.0
"""The HTTP routes: validate, call the service, shape the response. Thin."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from kalm_t5gemma2_vllm_plugin.engine.requests import DocumentId
from kalm_t5gemma2_vllm_plugin.scores import RankResult, score_from_margin
from kalm_t5gemma2_vllm_plugin.server import schemas as S
from kalm_t5gemma2_vllm_plugin.server import tei
from kalm_t5gemma2_vllm_plugin.server.errors import APIError
from kalm_t5gemma2_vllm_plugin.server.service import (
    PassageOptions,
    RankOutcome,
    RerankService,
)

__all__ = ["router"]

router = APIRouter()
T = TypeVar("T")


def _service(request: Request) -> RerankService:
    return request.app.state.service  # type: ignore[no-any-return]


def cancel_on_disconnect(
    handler: Callable[..., Awaitable[T]],
) -> Callable[..., Awaitable[T | Response]]:
    """Cancel the handler (and with it the engine requests) if the client leaves."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> T | Response:
        request: Request = kwargs["raw_request"]
        work = asyncio.ensure_future(handler(*args, **kwargs))
        watch = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait(
                {work, watch}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:  # also when this is cancelled (a shutdown): so is the work
            watch.cancel()
            work.cancel()  # no-op once it is done
        if work in done:
            return work.result()
        return Response(status_code=499)  # nobody is listening any more

    return wrapper


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _documents(request: S._RerankFields) -> list[str]:
    """Texts, then stored documents (as ``DocumentId``), in result-index order."""
    texts = [d if isinstance(d, str) else d.text for d in request.documents]
    documents = texts + [DocumentId(i) for i in request.document_ids]
    if not documents:
        raise APIError(
            422,
            "invalid_request",
            "documents: give at least one document (or document_ids).",
            field="documents",
        )
    return documents


def _stored_id(documents: list[str], index: int) -> str | None:
    return str(documents[index]) if isinstance(documents[index], DocumentId) else None


def _passage_options(request: S._PassageOptions) -> PassageOptions:
    chunk, alias = request.encoder_chunk_size, request.compression_ratio
    if None not in (chunk, alias) and chunk != alias:
        raise APIError(
            400,
            "invalid_request",
            f"encoder_chunk_size ({chunk}) and its alias compression_ratio "
            f"({alias}) disagree; send one of them.",
            field="compression_ratio",
        )
    return PassageOptions(
        long_document=request.long_document,
        window_overlap=request.window_overlap,
        encoder_chunk_size=chunk if chunk is not None else alias,
    )


def _windows(result: RankResult) -> dict[str, Any]:
    """A result's window fields (long_document max/mean), else none."""
    if "windows" not in result:
        return {}
    return {
        "windows": result["windows"],
        "best_window": S.BestWindow(**result["best_window"]),
    }


def _top(request: S.RerankRequest) -> int | None:
    if None not in (request.top_k, request.top_n) and request.top_k != request.top_n:
        raise APIError(
            400,
            "invalid_request",
            f"top_k ({request.top_k}) and its alias top_n ({request.top_n}) "
            f"disagree; send one of them.",
            field="top_n",
        )
    return request.top_k if request.top_k is not None else request.top_n


async def _rank(
    raw_request: Request,
    request: S._RerankFields,
    top: int | None,
    return_margin: bool = False,
) -> tuple[RankOutcome, list[str]]:
    service = _service(raw_request)
    service.check_model(request.model)
    texts = _documents(request)
    service.check_count(len(texts), "documents", service.config.max_documents)
    with service.admit():
        outcome = await service.rank(
            request.query,
            texts,
            request.instruction,
            top_k=top,
            return_margin=return_margin,
            document_max_length=request.max_tokens_per_doc,
            options=_passage_options(request),
        )
    _record(raw_request, len(texts), len(outcome.truncated))
    return outcome, texts


def _echo(documents: list[str], index: int, wanted: bool) -> S.DocumentEcho | None:
    """The text of a result when asked for (stored documents have none here)."""
    if not wanted or isinstance(documents[index], DocumentId):
        return None
    return S.DocumentEcho(text=documents[index])


def _record(request: Request, pairs: int, truncated: int) -> None:
    metrics = request.app.state.metrics
    metrics.pairs.inc(pairs)
    metrics.truncated.inc(truncated)


def _meta(outcome: RankOutcome | Any) -> S.Meta:
    warnings = []
    if outcome.truncated:
        warnings.append(
            f"{len(outcome.truncated)} document(s) were truncated to the "
            f"document length limit; see meta.truncated."
        )
    windows = None
    if outcome.windows is not None:
        windows = [count for count, _ in outcome.windows]
    return S.Meta(truncated=outcome.truncated, windows=windows, warnings=warnings)


def _usage(num_tokens: int) -> S.Usage:
    return S.Usage(prompt_tokens=num_tokens, total_tokens=num_tokens)


@router.get("/health", summary="Readiness: 200 once the engine is ready, else 503")
async def health(raw_request: Request) -> JSONResponse:
    service = _service(raw_request)
    retry = service.retry_after
    return JSONResponse(
        service.health(),
        status_code=200 if service.ready else 503,
        headers=None if service.ready or retry is None else {"Retry-After": str(retry)},
    )


@router.get(
    "/v1/models",
    response_model=S.ModelList,
    response_model_exclude_none=True,
    summary="The names clients may send as 'model' (OpenAI's list shape)",
)
async def models(raw_request: Request) -> S.ModelList:
    service = _service(raw_request)
    return S.ModelList(
        data=[
            S.ModelCard(
                id=name, created=service.created, max_model_len=service.max_model_len
            )
            for name in service.listed_model_names()
        ]
    )


@router.post(
    "/rerank",
    response_model=S.RerankResponse | list[tei.TEIRank],
    response_model_exclude_none=True,
    responses=tei.RERANK_ERRORS,
    summary="Rank documents for a query (KaLM contract, Cohere/Jina aliases, TEI)",
)
@cancel_on_disconnect
async def rerank(body: tei.RerankBody, raw_request: Request) -> S.RerankResponse | Any:
    request = tei.kalm_request(body)
    if request is None:  # TEI's dialect ("texts"): its own answer and errors
        return await tei.rerank(raw_request, body, _rank)
    service = _service(raw_request)
    outcome, texts = await _rank(
        raw_request, request, _top(request), request.return_margin
    )
    results = [
        S.RerankResult(
            index=r["corpus_id"],
            document_id=_stored_id(texts, r["corpus_id"]),
            score=r["score"],
            relevance_score=r["score"],
            margin=r.get("margin"),
            document=_echo(texts, r["corpus_id"], request.return_documents),
            **_windows(r),
        )
        for r in outcome.results
    ]
    return S.RerankResponse(
        model=service.config.model,
        results=results,
        meta=_meta(outcome),
        usage=_usage(outcome.num_tokens),
    )


@router.post(
    "/v1/rerank",
    response_model=S.JinaRerankResponse,
    response_model_exclude_none=True,
    summary="Jina-compatible rerank",
)
@cancel_on_disconnect
async def rerank_jina(
    request: S.JinaRerankRequest, raw_request: Request
) -> S.JinaRerankResponse:
    service = _service(raw_request)
    outcome, texts = await _rank(raw_request, request, request.top_n)
    results = [
        S.RelevanceResult(
            index=r["corpus_id"],
            document_id=_stored_id(texts, r["corpus_id"]),
            relevance_score=r["score"],
            document=_echo(texts, r["corpus_id"], request.return_documents),
            **_windows(r),
        )
        for r in outcome.results
    ]
    return S.JinaRerankResponse(
        model=request.model or service.config.model,
        usage=_usage(outcome.num_tokens),
        results=results,
        meta=_meta(outcome),
    )


@router.post(
    "/v2/rerank",
    response_model=S.CohereRerankResponse,
    response_model_exclude_none=True,
    summary="Cohere v2-compatible rerank",
)
@cancel_on_disconnect
async def rerank_cohere(
    request: S.CohereRerankRequest, raw_request: Request
) -> S.CohereRerankResponse:
    outcome, texts = await _rank(raw_request, request, request.top_n)
    results = [
        S.RelevanceResult(
            index=r["corpus_id"],
            document_id=_stored_id(texts, r["corpus_id"]),
            relevance_score=r["score"],
            document=_echo(texts, r["corpus_id"], request.return_documents),
            **_windows(r),
        )
        for r in outcome.results
    ]
    meta = _meta(outcome)
    return S.CohereRerankResponse(
        id=str(uuid.uuid4()),
        results=results,
        meta=S.CohereMeta(
            billed_units=S.CohereBilledUnits(search_units=1),
            tokens=S.CohereTokens(input_tokens=outcome.num_tokens),
            warnings=meta.warnings,
            truncated=meta.truncated,
            windows=meta.windows,
        ),
    )


@router.post(
    "/score",
    response_model=S.ScoreResponse,
    response_model_exclude_none=True,
    summary="Score (query, document) pairs in input order",
)
@cancel_on_disconnect
async def score(request: S.ScoreRequest, raw_request: Request) -> S.ScoreResponse:
    service = _service(raw_request)
    service.check_model(request.model)
    service.check_count(len(request.pairs), "pairs", service.config.max_pairs)
    with service.admit():
        scored = await service.score(
            [
                (
                    p.query,
                    p.document if p.document_id is None else DocumentId(p.document_id),
                )
                for p in request.pairs
            ],
            request.instruction,
            options=_passage_options(request),
        )
    _record(raw_request, len(request.pairs), len(scored.truncated))
    windows = scored.windows
    results = [
        S.ScoreResult(
            index=i,
            score=score_from_margin(m),
            id=pair.id,
            margin=m if request.return_margin else None,
            **(
                {}
                if windows is None
                else {
                    "windows": windows[i][0],
                    "best_window": S.BestWindow(
                        token_start=windows[i][1][0], token_end=windows[i][1][1]
                    ),
                }
            ),
        )
        for i, (pair, m) in enumerate(zip(request.pairs, scored.margins, strict=True))
    ]
    return S.ScoreResponse(
        model=service.config.model,
        results=results,
        meta=_meta(scored),
        usage=_usage(scored.num_tokens),
    )


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(raw_request: Request) -> Response:
    body = raw_request.app.state.metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
