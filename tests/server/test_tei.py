# SPDX-License-Identifier: Apache-2.0
"""TEI's dialect on ``POST /rerank`` and TEI's ``GET /info``, over real HTTP.

A TEI request is scored by the same engine path as a ``/rerank`` request, so
every TEI answer is compared with the KaLM answer of the same server.
"""

from __future__ import annotations

import json

import httpx
import pytest

from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from tests.helpers import QUERY

pytestmark = pytest.mark.server

TEXTS = [
    "The capital of China is Beijing.",
    "Gravity attracts bodies toward one another.",
    "北京是中国的首都",
    synthetic_text(60, seed=8),
]


def _kalm(http: httpx.Client, texts: list[str]) -> dict:
    response = http.post(
        "/rerank", json={"query": QUERY, "documents": texts, "return_margin": True}
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_a_texts_body_is_answered_as_tei_with_the_rerank_scores(
    http: httpx.Client,
) -> None:
    kalm = _kalm(http, TEXTS)
    response = http.post("/rerank", json={"query": QUERY, "texts": TEXTS})
    assert response.status_code == 200, response.text
    ranks = response.json()
    assert isinstance(ranks, list) and all(set(r) == {"index", "score"} for r in ranks)
    assert [r["index"] for r in ranks] == [r["index"] for r in kalm["results"]]
    for rank, want in zip(ranks, kalm["results"], strict=True):
        assert rank["score"] == pytest.approx(want["score"], abs=1e-6)
    assert response.headers["x-kalm-truncated"] == "0"
    assert int(response.headers["x-compute-tokens"]) == kalm["usage"]["prompt_tokens"]


def test_raw_scores_are_the_margins_and_return_text_echoes(http: httpx.Client) -> None:
    kalm = _kalm(http, TEXTS)
    ranks = http.post(
        "/rerank",
        json={
            "query": QUERY,
            "texts": TEXTS,
            "raw_scores": True,
            "return_text": True,
            "truncation_direction": "Right",
            "truncate": True,
        },
    ).json()
    assert [r["index"] for r in ranks] == [r["index"] for r in kalm["results"]]
    for rank, want in zip(ranks, kalm["results"], strict=True):
        assert rank["score"] == pytest.approx(want["margin"], abs=1e-5)
        assert rank["text"] == TEXTS[rank["index"]]


def test_top_n_is_honoured_as_an_extension(http: httpx.Client) -> None:
    # LiteLLM's huggingface provider sends top_n and applies none itself.
    ranks = http.post("/rerank", json={"query": QUERY, "texts": TEXTS, "top_n": 2})
    kalm = _kalm(http, TEXTS)
    assert [r["index"] for r in ranks.json()] == [
        r["index"] for r in kalm["results"][:2]
    ]


def test_long_texts_are_cut_and_counted_unless_truncate_is_false(
    http: httpx.Client,
) -> None:
    texts = ["short", synthetic_text(1500, seed=3), synthetic_text(1400, seed=4)]
    for extra in ({}, {"truncate": None}, {"truncate": True}):
        response = http.post("/rerank", json={"query": QUERY, "texts": texts, **extra})
        assert response.status_code == 200, response.text
        assert response.headers["x-kalm-truncated"] == "2"
    refused = http.post(
        "/rerank", json={"query": QUERY, "texts": texts, "truncate": False}
    )
    assert refused.status_code == 413
    assert refused.json() == {
        "error": "texts.1 and 1 more text: longer than max_input_length (1024 "
        "tokens) and truncate is false; send truncate: true (or leave it out) to "
        "have texts cut.",
        "error_type": "Validation",
    }
    fits = http.post(
        "/rerank", json={"query": QUERY, "texts": ["a"], "truncate": False}
    )
    assert fits.status_code == 200, fits.text


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            {"query": "q", "texts": ["a"], "truncation_direction": "Left"},
            "truncation_direction: only right truncation is supported (the model "
            'keeps the beginning of a text); send "Right" or leave the field out',
        ),
        (
            {"query": "q", "texts": ["a"], "truncation_direction": "up"},
            "truncation_direction: Input should be 'Right' ('Left' is not supported)",
        ),
        (
            {"query": "q", "texts": ["a"], "documents": ["b"]},
            "texts: TEI's texts and documents cannot both be given; send texts "
            "(TEI's schema) or documents (this service's).",
        ),
        (
            {"query": "q", "texts": ["a"], "document_ids": ["doc-1"]},
            "texts: TEI's texts and document_ids cannot both be given; send texts "
            "(TEI's schema) or documents (this service's).",
        ),
        (
            {"query": "q", "texts": []},
            "texts: List should have at least 1 item after validation, not 0",
        ),
        ({"texts": ["a"]}, "query: Field required"),
        (
            {"query": "q", "texts": ["a", 3]},
            "texts.1: Input should be a valid string",
        ),
        (
            {"query": "q", "texts": ["a"], "raw_scores": "yes"},
            "raw_scores: Input should be a valid boolean",
        ),
        (
            {"query": "q", "texts": "a"},
            "texts: Input should be a valid list",
        ),
        (
            {"query": "q", "texts": ["a"], "top_n": -1},
            "top_n: Input should be greater than or equal to 0",
        ),
        (
            {"query": "ok \ud800", "texts": ["a"]},
            "query: must be valid Unicode text; found a lone surrogate U+D800 at "
            "character 3",
        ),
        (
            {"query": "q", "texts": ["a", "ok \ud800 then"]},
            "texts.1: must be valid Unicode text; found a lone surrogate U+D800 at "
            "character 3",
        ),
    ],
    ids=[
        "left",
        "unknown-direction",
        "texts-and-documents",
        "texts-and-document-ids",
        "no-texts",
        "no-query",
        "int-text",
        "string-raw-scores",
        "texts-not-list",
        "negative-top-n",
        "surrogate-query",
        "surrogate-text",
    ],
)
def test_bad_tei_requests_get_tei_errors_naming_the_field(
    http: httpx.Client, payload: dict, message: str
) -> None:
    response = http.post(
        "/rerank",
        content=json.dumps(payload).encode(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json() == {"error": message, "error_type": "Validation"}


def test_too_many_texts_is_a_tei_413(http: httpx.Client) -> None:
    limit = http.get("/health").json()["limits"]["max_documents"]
    response = http.post("/rerank", json={"query": "q", "texts": ["a"] * (limit + 1)})
    assert response.status_code == 413
    body = response.json()
    assert body["error_type"] == "Validation" and f"at most {limit}" in body["error"]


def test_info_answers_in_tei_shape(http: httpx.Client) -> None:
    health = http.get("/health").json()
    info = http.get("/info").json()
    assert info["model_type"] == {
        "reranker": {"id2label": {"0": "yes"}, "label2id": {"yes": 0}}
    }
    assert info["model_id"] == health["model"] and "/" not in info["model_id"]
    assert info["model_dtype"] == "float32"
    assert info["max_input_length"] == health["document_max_length"] == 1024
    assert info["max_client_batch_size"] == health["limits"]["max_documents"]
    assert (
        info["max_concurrent_requests"] == health["limits"]["max_concurrent_requests"]
    )
    assert info["max_batch_tokens"] == health["max_num_batched_tokens"]
    assert info["auto_truncate"] is True and info["version"]


def test_openapi_documents_both_rerank_shapes(http: httpx.Client) -> None:
    document = http.get("/openapi.json").json()
    operation = document["paths"]["/rerank"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert {b["$ref"].rsplit("/", 1)[1] for b in body["anyOf"]} == {
        "RerankRequest",
        "TEIRerankRequest",
    }
    answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/RerankResponse"} in answer["anyOf"]
    assert {
        "type": "array",
        "items": {"$ref": "#/components/schemas/TEIRank"},
    } in answer["anyOf"]
    assert "/info" in document["paths"]
