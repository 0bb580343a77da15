# SPDX-License-Identifier: Apache-2.0
"""Hugging Face TEI's dialect: its ``POST /rerank`` body and answer, ``GET /info``.

A ``/rerank`` body whose ``texts`` is given and that has no ``documents`` or
``document_ids`` is a TEI request, so the TEI integrations of LlamaIndex,
Haystack, LiteLLM, RAGFlow, ``rerankers`` and Dify work unchanged. It is scored
by the same engine path as any ``/rerank`` request (``routes._rank``) and
answered in TEI's shape: a bare list ``[{"index", "score", "text"?}]`` sorted by
score, ``score`` = P(yes), or the margin with ``raw_scores: true``. Errors on a
TEI request use TEI's ``{"error": str, "error_type": str}`` (the error types of
TEI: ``Validation``, ``Overloaded``, ``Unhealthy``, ``Backend``); what is refused
before the body is read (auth, body size, shutdown) keeps the service's shape.

Truncation (a decision): TEI's ``truncate`` null means "the server's
``--auto-truncate``", which is always on here, as on every route: texts longer
than the document limit are cut as the model requires, and the
``x-kalm-truncated`` response header counts them. An explicit
``truncate: false`` is TEI's opt-in rejection and is honoured: 413 when a text
was longer than ``max_input_length`` (the document limit; queries are cut to
their own limit as on every route). Only right truncation exists (the model
keeps a document's beginning), so ``truncation_direction: "Left"`` is a 422.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SkipValidation,
    StrictStr,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from kalm_t5gemma2_vllm_plugin import __version__, errors
from kalm_t5gemma2_vllm_plugin.server import schemas as S
from kalm_t5gemma2_vllm_plugin.server.errors import APIError, api_error

__all__ = [
    "RERANK_ERRORS",
    "RerankBody",
    "TEIError",
    "TEIInfo",
    "TEIRank",
    "TEIRerankRequest",
    "kalm_request",
    "rerank",
    "router",
]

router = APIRouter()

#: Response header: how many texts were cut to the document limit.
TRUNCATED_HEADER = "x-kalm-truncated"
#: TEI's response header for the tokens a request computed.
TOKENS_HEADER = "x-compute-tokens"


def _right_only(value: str) -> str:
    if value.lower() == "right":
        return value
    if value.lower() == "left":
        raise PydanticCustomError(
            "truncation_direction",
            "only right truncation is supported (the model keeps the beginning of "
            'a text); send "Right" or leave the field out',
        )
    raise PydanticCustomError(
        "truncation_direction", "Input should be 'Right' ('Left' is not supported)"
    )


Direction = Annotated[
    StrictStr,
    AfterValidator(_right_only),
    WithJsonSchema({"type": "string", "enum": ["Right", "right"]}),
]


class TEIRerankRequest(BaseModel):
    """``POST /rerank`` in TEI's shape (told apart by ``texts``)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    query: S.Text = Field(description="The search query.")
    texts: list[S.Text] = Field(
        min_length=1, description="TEI: the documents to rank, as strings."
    )
    raw_scores: bool = Field(
        False, description="Score = margin (yes_logit - no_logit) instead of P(yes)."
    )
    return_text: bool = Field(False, description="Echo each text in its result.")
    truncate: bool | None = Field(
        None,
        description="null or true: cut long texts (counted in the x-kalm-truncated "
        "header); false: 413 when a text is longer than max_input_length.",
    )
    truncation_direction: Direction = Field(
        "Right", description='Only "Right" (the model keeps a text\'s beginning).'
    )
    top_n: int | None = Field(
        None,
        ge=0,
        description="Extension (LiteLLM sends it, TEI ignores it): keep the best n "
        "results (null: all).",
    )


class TEIRank(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(description="Position of the text in the request.")
    score: float = Field(description="P(yes), or the margin with raw_scores.")
    text: str | None = Field(None, description="The text, with return_text.")


class TEIError(BaseModel):
    """TEI's error body, for errors on TEI-shaped requests."""

    error: str
    error_type: str = Field(description="Validation, Overloaded, Unhealthy, Backend")


#: ``/rerank``'s errors as documented: the service's body, or TEI's for a TEI
#: request (what the guard refuses before reading a body, 401 and 415, is
#: always the service's).
RERANK_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {
        "model": S.ErrorResponse | TEIError,
        "description": f"{meaning}; a TEI request (texts) gets TEI's error body",
    }
    for status, meaning in (
        (400, "A refused value"),
        (413, "Documents, texts or tokens over a limit (or TEI's truncate: false)"),
        (422, "A field of the wrong type, or missing"),
        (429, "Too many requests in flight (see Retry-After)"),
        (500, "Internal error (details in the server log)"),
        (503, "Starting, draining or engine unavailable (see Retry-After)"),
    )
}

#: The ``/rerank`` body as documented (either shape); validated by ``kalm_request``
#: or ``rerank`` once the shape is known, so errors come in that shape's format.
RerankBody = Annotated[
    SkipValidation[S.RerankRequest | TEIRerankRequest],
    Body(description="KaLM/Cohere/Jina fields (documents), or TEI's (texts)."),
]


def _is_tei(body: Any) -> bool:
    return isinstance(body, dict) and body.get("texts") is not None


def kalm_request(body: Any) -> S.RerankRequest | None:
    """The validated KaLM request, or ``None`` for a TEI-shaped body.

    Validation errors are FastAPI's own (same locations and messages as a
    route that declares the model), so the service's error mapping applies.
    """
    if _is_tei(body):
        return None
    try:
        return S.RerankRequest.model_validate(body, from_attributes=True)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)],
            body=body,
        ) from None


#: ``routes._rank``: the one engine path of every ``/rerank`` request.
RankCall = Callable[
    [Request, S.RerankRequest, int | None, bool], Awaitable[tuple[Any, list[str]]]
]


class _Refused(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = "Validation",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.error_type, self.headers = error_type, headers

    @classmethod
    def from_api(cls, error: APIError) -> _Refused:
        if error.status == 429:
            kind = "Overloaded"
        elif error.status == 503:
            kind = "Unhealthy"
        elif error.status >= 500:
            kind = "Backend"
        else:
            kind = "Validation"
        return cls(error.status, error.message, kind, error.headers)

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.message, "error_type": self.error_type},
            status_code=self.status,
            headers=self.headers,
        )


def _validated(body: dict[str, Any]) -> TEIRerankRequest:
    both = [k for k in ("documents", "document_ids") if body.get(k) is not None]
    if both:
        raise _Refused(
            422,
            f"texts: TEI's texts and {both[0]} cannot both be given; send texts "
            f"(TEI's schema) or documents (this service's).",
        )
    try:
        return TEIRerankRequest.model_validate(body)
    except ValidationError as exc:
        problems = exc.errors(include_url=False)
        first = problems[0]
        field = ".".join(str(p) for p in first["loc"])
        message = f"{field}: {first['msg']}" if field else str(first["msg"])
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more problem(s))"
        raise _Refused(422, message) from None


async def rerank(raw_request: Request, body: dict[str, Any], rank: RankCall) -> Any:
    """Answer a TEI-shaped ``/rerank`` body through ``rank`` (``routes._rank``)."""
    service = raw_request.app.state.service
    try:
        request = _validated(body)
        service.check_count(len(request.texts), "texts", service.config.max_documents)
        # Already validated: the same fields, without a second pass over the texts.
        kalm = S.RerankRequest.model_construct(
            query=request.query, documents=list(request.texts)
        )
        outcome, _ = await rank(raw_request, kalm, request.top_n, request.raw_scores)
        # Known once tokenized, so a refused request was scored: the price of
        # one path for all requests, paid only by an explicit truncate: false.
        if request.truncate is False and outcome.truncated:
            raise _Refused(413, _too_long(service, outcome.truncated))
    except _Refused as refused:
        return refused.response()
    except errors.KaLMError as exc:
        return _Refused.from_api(api_error(exc)).response()
    except APIError as exc:
        return _Refused.from_api(exc).response()
    ranks = [
        {
            "index": r["corpus_id"],
            "score": r["margin"] if request.raw_scores else r["score"],
            **({"text": request.texts[r["corpus_id"]]} if request.return_text else {}),
        }
        for r in outcome.results
    ]
    return JSONResponse(
        ranks,
        headers={
            TRUNCATED_HEADER: str(len(outcome.truncated)),
            TOKENS_HEADER: str(outcome.num_tokens),
        },
    )


def _too_long(service: Any, truncated: list[int]) -> str:
    limit = service.config.engine.settings.document_max_length
    more = len(truncated) - 1
    also = f" and {more} more text{'s' if more > 1 else ''}" if more else ""
    return (
        f"texts.{truncated[0]}{also}: longer than max_input_length ({limit} tokens) "
        f"and truncate is false; send truncate: true (or leave it out) to have "
        f"texts cut."
    )


class TEIClassifier(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class TEIModelType(BaseModel):
    reranker: TEIClassifier


class TEIInfo(BaseModel):
    """TEI's ``GET /info``, filled from this server's settings."""

    model_id: str = Field(description="The model's name (never a local path).")
    model_sha: str | None = None
    model_dtype: str
    model_type: TEIModelType = Field(
        description="Always a reranker; its one label is 'yes' (score = P(yes))."
    )
    max_concurrent_requests: int
    max_input_length: int = Field(description="Document limit in tokens.")
    max_batch_tokens: int | None = Field(
        description="vLLM's max_num_batched_tokens (null until the engine is up)."
    )
    max_batch_requests: int | None = None
    max_client_batch_size: int = Field(
        description="Texts per request (--max-documents)."
    )
    auto_truncate: bool = Field(description="Always true: see the truncate field.")
    version: str = Field(description="This package's version.")


@router.get(
    "/info",
    response_model=TEIInfo,
    summary="TEI-compatible model info (Dify's TEI plugin reads it)",
)
async def info(raw_request: Request) -> TEIInfo:
    health = raw_request.app.state.service.health()
    limits = health["limits"]
    return TEIInfo(
        model_id=health["model"],
        model_dtype=health["dtype"] or "auto",
        model_type=TEIModelType(
            reranker=TEIClassifier(id2label={"0": "yes"}, label2id={"yes": 0})
        ),
        max_concurrent_requests=limits["max_concurrent_requests"],
        max_input_length=health["document_max_length"],
        max_batch_tokens=health["max_num_batched_tokens"],
        max_client_batch_size=limits["max_documents"],
        auto_truncate=True,
        version=__version__,
    )
