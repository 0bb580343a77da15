# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-serve --passage-store DIR --decoder-only``: no encoder, ids only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kalm_t5gemma2_vllm_plugin import KaLMVLLMReranker
from tests.helpers import MARGIN_ATOL, QUERY, corpus_docs
from tests.server.conftest import kalm_serve

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def http(
    tiny_checkpoint: Path, store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    running = kalm_serve(
        tiny_checkpoint,
        tmp_path_factory.mktemp("decoder-only"),
        "--passage-store",
        str(store),
        "--decoder-only",
    )
    with httpx.Client(base_url=running.url, trust_env=False, timeout=120) as client:
        yield client
    assert running.stop() == 0


def _counter(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


def test_ranks_stored_documents_without_encoding(
    http: httpx.Client, engine: KaLMVLLMReranker
) -> None:
    health = http.get("/health").json()
    assert health["decoder_only"] is True
    assert health["passages_in_store"] == len(corpus_docs())
    docs = corpus_docs()
    ids = list(docs)
    expected = engine.margins([(QUERY, docs[i]) for i in ids])
    body = http.post(
        "/rerank", json={"query": QUERY, "document_ids": ids, "return_margin": True}
    ).json()
    assert len(body["results"]) == len(ids)
    for result in body["results"]:
        assert result["document_id"] == ids[result["index"]]
        assert abs(result["margin"] - expected[result["index"]]) <= MARGIN_ATOL
    assert body["meta"]["truncated"] == [ids.index("long")]
    assert _counter(http, "kalm_passages_encoded_total") == 0
    assert _counter(http, "kalm_passages_from_store_total") >= len(ids)


def test_text_documents_are_refused_clearly(http: httpx.Client) -> None:
    response = http.post("/rerank", json={"query": QUERY, "documents": ["some text"]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "decoder-only" in error["message"] and error["field"] == "documents"
