# SPDX-License-Identifier: Apache-2.0
"""Long documents and per-request compression on every route of a live
server (document limit 64 tokens), against the fp32 reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kalm_t5gemma2_vllm_plugin import KaLMReranker
from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from tests.helpers import QUERY
from tests.server.conftest import RunningServer, kalm_serve

pytestmark = pytest.mark.server

LIMIT = 64
DOCS = [synthetic_text(301, seed=81), "A short document.", synthetic_text(150, seed=82)]
ATOL = 1e-4


@pytest.fixture(scope="module")
def windowed(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    running = kalm_serve(
        tiny_checkpoint,
        tmp_path_factory.mktemp("serve-long"),
        "--document-max-length",
        str(LIMIT),
        "--max-windows-per-document",
        "12",
        "--max-pairs",
        "20",
    )
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


@pytest.fixture()
def http(windowed: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=windowed.url, trust_env=False, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint: Path) -> KaLMReranker:
    return KaLMReranker(str(tiny_checkpoint), dtype="float32", max_length=LIMIT)


def test_rerank_max_reports_windows_and_matches_the_reference(
    http: httpx.Client, oracle: KaLMReranker
) -> None:
    body = {"query": QUERY, "documents": DOCS, "long_document": "max"}
    answer = http.post("/rerank", json={**body, "return_margin": True})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    want = oracle.rank(QUERY, DOCS, long_document="max", return_margin=True)
    assert [r["index"] for r in data["results"]] == [w["corpus_id"] for w in want]
    for got, expected in zip(data["results"], want, strict=True):
        assert abs(got["margin"] - expected["margin"]) <= ATOL
        assert got["windows"] == expected["windows"]
        assert got["best_window"] == expected["best_window"]
    assert data["meta"]["windows"] == [
        next(w["windows"] for w in want if w["corpus_id"] == i) for i in range(3)
    ]
    # Jina and Cohere shapes carry the same fields
    for route in ("/v1/rerank", "/v2/rerank"):
        other = http.post(route, json=body)
        assert other.status_code == 200, other.text
        first = other.json()["results"][0]
        assert first["index"] == want[0]["corpus_id"]
        assert first["best_window"] == want[0]["best_window"]


def test_score_mean_and_compression_alias(
    http: httpx.Client, tiny_checkpoint: Path
) -> None:
    pairs = [{"query": QUERY, "document": d} for d in DOCS]
    answer = http.post(
        "/score",
        json={
            "pairs": pairs,
            "long_document": "mean",
            "compression_ratio": 16,
            "return_margin": True,
        },
    )
    assert answer.status_code == 200, answer.text
    want = KaLMReranker(
        str(tiny_checkpoint), dtype="float32", max_length=LIMIT, chunk_size=16
    ).predict([(QUERY, d) for d in DOCS], long_document="mean", return_margin=True)
    for got, expected in zip(answer.json()["results"], want, strict=True):
        assert abs(got["margin"] - expected["margin"]) <= ATOL
        assert got["windows"] == expected["windows"]


def test_compression_per_request_matches_the_reference(
    http: httpx.Client, tiny_checkpoint: Path
) -> None:
    answer = http.post(
        "/rerank",
        json={
            "query": QUERY,
            "documents": DOCS,
            "encoder_chunk_size": 32,
            "return_margin": True,
        },
    )
    assert answer.status_code == 200, answer.text
    want = KaLMReranker(
        str(tiny_checkpoint), dtype="float32", max_length=LIMIT, chunk_size=32
    ).margins([(QUERY, d) for d in DOCS])
    for got in answer.json()["results"]:
        assert abs(got["margin"] - want[got["index"]]) <= ATOL
        assert "windows" not in got


@pytest.mark.parametrize(
    ("body", "status", "field", "words"),
    [
        ({"encoder_chunk_size": 64}, 422, "encoder_chunk_size", "trained for"),
        ({"compression_ratio": 128}, 422, "compression_ratio", "trained for"),
        (
            {"encoder_chunk_size": 2},
            400,
            "encoder_chunk_size",
            "finer than this engine",
        ),
        (
            {"encoder_chunk_size": 8, "compression_ratio": 16},
            400,
            "compression_ratio",
            "disagree",
        ),
        ({"long_document": "first"}, 422, "long_document", ""),
        ({"window_overlap": -1}, 422, "window_overlap", ""),
        # 3 documents of 301 tokens make > 12 windows each: the first is named
        (
            {"long_document": "max", "documents": ["x", synthetic_text(2000, seed=1)]},
            413,
            "documents.1",
            "more than 12 windows",
        ),
        # windows count as pairs: 3 x ~8 windows > 20
        (
            {"long_document": "max", "documents": [DOCS[0]] * 3},
            413,
            "documents",
            "max_pairs",
        ),
    ],
)
def test_bad_window_and_compression_fields_are_named(
    http: httpx.Client,
    body: dict[str, object],
    status: int,
    field: str | None,
    words: str,
) -> None:
    answer = http.post("/rerank", json={"query": QUERY, "documents": DOCS, **body})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    if field is not None:
        assert error["field"] == field, error
    assert words in error["message"]
