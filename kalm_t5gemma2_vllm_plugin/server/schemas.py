# SPDX-License-Identifier: Apache-2.0
"""Request and response models of the HTTP service.

Three wire shapes share one scoring core:

* ``/rerank`` and ``/score``: the KaLM adapter's contract (``top_k``, ``index``,
  ``score``, ``margin``), also accepting what Cohere/Jina-style clients send to
  the same route (``top_n``, ``model``, ``{"text": ...}`` documents,
  ``return_documents``) and returning ``relevance_score`` beside ``score``;
* ``/v1/rerank``: Jina's shape; ``/v2/rerank``: Cohere v2's shape.

Unknown request fields are ignored (clients add their own), types are strict
(no silent ``"3"`` -> ``3``; booleans also accept ``"true"``/``"false"``, which
some clients send), every string the service reads is valid Unicode
(:data:`Text`: no lone surrogate reaches a tokenizer or a response), and an
echoed ``id`` is JSON that can be written back unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kalm_t5gemma2_vllm_plugin.constants import SUPPORTED_ENCODER_CHUNK_SIZES
from kalm_t5gemma2_vllm_plugin.validation import (
    json_echo_problem,
    lenient_bool,
    unicode_problem,
)
from kalm_t5gemma2_vllm_plugin.windows import LONG_DOCUMENT_POLICIES

__all__ = [
    "CohereRerankRequest",
    "CohereRerankResponse",
    "DocumentObject",
    "ErrorResponse",
    "Flag",
    "JinaRerankRequest",
    "JinaRerankResponse",
    "ModelList",
    "RerankRequest",
    "RerankResponse",
    "ScorePair",
    "ScoreRequest",
    "ScoreResponse",
    "Text",
]


def _valid_text(value: str) -> str:
    if (problem := unicode_problem(value)) is not None:
        raise PydanticCustomError("invalid_unicode", problem)
    return value


def _valid_echo(value: Any) -> Any:
    if (problem := json_echo_problem(value)) is not None:
        raise PydanticCustomError("invalid_echo", problem)
    return value


#: Every string field of every request: a str holding valid Unicode (JSON's
#: ``"\ud800"`` and CESU-8 bytes decode to lone surrogates, which no tokenizer
#: or UTF-8 encoder accepts), so a bad one is a 422 naming the field.
Text = Annotated[StrictStr, AfterValidator(_valid_text)]

#: A boolean field: JSON ``true``/``false``, or those words as strings.
Flag = Annotated[bool, BeforeValidator(lenient_bool)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DocumentObject(BaseModel):
    """A document given as an object; fields besides ``text`` are ignored."""

    model_config = ConfigDict(extra="allow", strict=True)
    text: Text = Field(description="The document text.")


def _valid_document(document: str | DocumentObject) -> str | DocumentObject:
    # A string is checked after the union, so that pydantic still names the
    # branches "str" and "DocumentObject" (server/errors.py reads them).
    return _valid_text(document) if isinstance(document, str) else document


Document = Annotated[
    StrictStr | DocumentObject,
    AfterValidator(_valid_document),
    Field(description='A document: a string, or an object {"text": ...}.'),
]


def _trained_chunk_size(value: int | None) -> int | None:
    top = SUPPORTED_ENCODER_CHUNK_SIZES[-1]
    if value is not None and value not in SUPPORTED_ENCODER_CHUNK_SIZES:
        beyond = (
            f"; the model was trained for Matryoshka compression 1x to {top}x"
            if value > top
            else ""
        )
        raise PydanticCustomError(
            "chunk_size",
            "must be one of {allowed}{beyond}",
            {"allowed": list(SUPPORTED_ENCODER_CHUNK_SIZES), "beyond": beyond},
        )
    return value


ChunkSize = Annotated[int | None, AfterValidator(_trained_chunk_size)]


def _policy(value: str) -> str:
    if value not in LONG_DOCUMENT_POLICIES:
        raise PydanticCustomError(
            "long_document",
            "must be one of {allowed}",
            {"allowed": list(LONG_DOCUMENT_POLICIES)},
        )
    return value


#: A long-document policy: Unicode checked first, as every string field.
Policy = Annotated[Text, AfterValidator(_policy)]


class _PassageOptions(_Request):
    """How each document is read: long documents, compression."""

    long_document: Policy = Field(
        "truncate",
        json_schema_extra={"enum": list(LONG_DOCUMENT_POLICIES)},
        description="A document longer than the document limit: keep its head "
        "(truncate), or score windows of it and keep the best (max) or the mean "
        "of their margins (mean). Results then carry windows and best_window.",
    )
    window_overlap: int | None = Field(
        None,
        ge=0,
        description="Tokens shared by neighbouring windows (default 80, at most "
        "a quarter of a window).",
    )
    encoder_chunk_size: ChunkSize = Field(
        None,
        description="Per-request compression: pool passages at this factor, a "
        "multiple of the server's encoder_chunk_size up to 32 (default: the "
        "server's). Cached and stored states are re-pooled exactly.",
    )
    compression_ratio: ChunkSize = Field(
        None, description="Alias of encoder_chunk_size."
    )


class _RerankFields(_PassageOptions):
    model: Text | None = Field(
        None, description="Checked against the served model names when given."
    )
    query: Text = Field(description="The search query.")
    documents: list[Document] = Field(
        default_factory=list,
        description="Documents to rank (strings or {text} objects).",
    )
    document_ids: list[Text] = Field(
        default_factory=list,
        description="Extension: ids of documents in the server's passage store "
        "(--passage-store); result indices count documents first, then these.",
    )
    instruction: Text | None = Field(
        None, description="Task instruction for this request (default: the server's)."
    )
    max_tokens_per_doc: int | None = Field(
        None,
        ge=1,
        description="Cut each document to this many encoder tokens (the "
        '"<Document>: " prefix counts), never beyond the server limit.',
    )


class RerankRequest(_RerankFields):
    """``POST /rerank``: the KaLM contract plus the Cohere/Jina aliases."""

    top_k: int | None = Field(
        None, ge=0, description="Keep the best k results (0: none; null: all)."
    )
    top_n: int | None = Field(None, ge=0, description="Alias of top_k.")
    return_margin: Flag = Field(
        False, description="Also return margin = yes_logit - no_logit."
    )
    return_documents: Flag = Field(
        False, description="Echo each document's text in its result."
    )


class JinaRerankRequest(_RerankFields):
    """``POST /v1/rerank``, Jina-compatible."""

    top_n: int | None = Field(
        None, ge=1, description="Keep the best n results (null: all)."
    )
    return_documents: Flag = Field(True, description="Echo the documents.")


class CohereRerankRequest(_RerankFields):
    """``POST /v2/rerank``, Cohere v2-compatible."""

    top_n: int | None = Field(
        None, ge=1, description="Keep the best n results (null: all)."
    )
    return_documents: Flag = Field(
        False, description="Extension: echo the documents (Cohere v2 never does)."
    )


class ScorePair(_Request):
    query: Text = Field(description="The search query.")
    document: Text | None = Field(None, description="The document text.")
    document_id: Text | None = Field(
        None, description="Or: the id of a document in the passage store."
    )
    id: Annotated[Any, AfterValidator(_valid_echo)] = Field(
        None,
        description="Echoed back in the result when given: any JSON value "
        "without NaN/Infinity, nested at most 64 levels.",
    )

    @model_validator(mode="after")
    def _one_document(self) -> ScorePair:
        if (self.document is None) == (self.document_id is None):
            raise ValueError("give exactly one of 'document' and 'document_id'")
        return self


class ScoreRequest(_PassageOptions):
    """``POST /score``: pairs scored in input order."""

    model: Text | None = Field(None, description="Checked when given.")
    pairs: list[ScorePair] = Field(min_length=1, description="(query, document) pairs.")
    instruction: Text | None = Field(None, description="Task instruction.")
    return_margin: Flag = Field(False, description="Also return the margin.")


# --- responses -----------------------------------------------------------------------
class DocumentEcho(_Response):
    text: str


class Meta(_Response):
    truncated: list[int] = Field(
        description="Indices of documents cut to the document length limit."
    )
    windows: list[int] | None = Field(
        None,
        description="With long_document max or mean: windows scored per "
        "document, by document index.",
    )
    warnings: list[str] = Field(default_factory=list)


class BestWindow(_Response):
    token_start: int = Field(description="First token, in the document's tokens.")
    token_end: int = Field(description="One past the last token.")


class Usage(_Response):
    prompt_tokens: int = Field(description="Decoder plus encoder tokens scored.")
    total_tokens: int


class RerankResult(_Response):
    index: int
    document_id: str | None = None
    score: float = Field(description="P(yes) = sigmoid(margin).")
    relevance_score: float = Field(description="Same as score (Cohere/Jina name).")
    margin: float | None = None
    document: DocumentEcho | None = None
    windows: int | None = None
    best_window: BestWindow | None = None


class RerankResponse(_Response):
    object: str = "rerank"
    model: str
    results: list[RerankResult]
    meta: Meta
    usage: Usage


class ScoreResult(_Response):
    index: int
    score: float
    id: Any = None
    margin: float | None = None
    windows: int | None = None
    best_window: BestWindow | None = None


class ScoreResponse(_Response):
    object: str = "score"
    model: str
    results: list[ScoreResult]
    meta: Meta
    usage: Usage


class RelevanceResult(_Response):
    """A result as Jina and Cohere shape it."""

    index: int
    document_id: str | None = None
    relevance_score: float
    document: DocumentEcho | None = None
    windows: int | None = None
    best_window: BestWindow | None = None


class JinaRerankResponse(_Response):
    model: str
    usage: Usage
    results: list[RelevanceResult]
    meta: Meta


class CohereApiVersion(_Response):
    version: str = "2"


class CohereBilledUnits(_Response):
    search_units: int


class CohereTokens(_Response):
    input_tokens: int
    output_tokens: int = 0


class CohereMeta(_Response):
    api_version: CohereApiVersion = Field(default_factory=CohereApiVersion)
    billed_units: CohereBilledUnits
    tokens: CohereTokens
    warnings: list[str] = Field(default_factory=list)
    truncated: list[int] = Field(default_factory=list)
    windows: list[int] | None = None


class CohereRerankResponse(_Response):
    id: str
    results: list[RelevanceResult]
    meta: CohereMeta


class ModelCard(_Response):
    """One served model name, as OpenAI's ``GET /v1/models`` lists it."""

    id: str = Field(description="A name clients may send as 'model'.")
    object: str = "model"
    created: int = Field(description="When this server started (Unix time).")
    owned_by: str = "kalm"
    max_model_len: int | None = None


class ModelList(_Response):
    object: str = "list"
    data: list[ModelCard]


class ErrorDetail(_Response):
    type: str = Field(description="A stable machine-readable kind, e.g. invalid_json.")
    message: str = Field(description="What is wrong and what is allowed.")
    field: str | None = Field(
        None, description="The request field at fault, as a JSON path (pairs.0.id)."
    )


class ErrorResponse(_Response):
    """Every 4xx and 5xx body of this service."""

    error: ErrorDetail
    detail: str = Field(
        description="The same message, for clients that read a top-level detail "
        "(Jina-style)."
    )
