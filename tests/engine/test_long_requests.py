# SPDX-License-Identifier: Apache-2.0
"""Requests near max_model_len complete and never block the ones behind them
(the engine's sizes come from engine_sizes; each test builds its own engine)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from kalm_t5gemma2_vllm_plugin import KaLMReranker, KaLMVLLMReranker
from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError
from tests.helpers import MARGIN_ATOL, QUERY
from tests.server.conftest import kalm_serve

pytestmark = pytest.mark.engine

#: Chunk 1 keeps every encoder token as a decoder row: a 3,000-token document
#: makes a request of ~3,600 positions, beyond vLLM's default token budget.
LONG = dict(document_max_length=3000, encoder_chunk_size=1)
LONG_DOC = synthetic_text(2990, seed=7)
SHORT_DOCS = ["The capital of China is Beijing.", synthetic_text(30, seed=8)]


def test_a_request_near_max_model_len_completes_and_so_do_those_after_it(
    tiny_checkpoint: Path,
) -> None:
    with KaLMVLLMReranker(str(tiny_checkpoint), dtype="float32", **LONG) as reranker:
        sizes = reranker.sizes
        assert sizes.max_num_batched_tokens >= sizes.max_model_len
        assert sizes.longest_request > 3000
        together = reranker.margins([(QUERY, d) for d in [LONG_DOC, *SHORT_DOCS]])
        after = reranker.margins([(QUERY, d) for d in SHORT_DOCS])
    reference = KaLMReranker(
        str(tiny_checkpoint), dtype="float32", max_length=3000, chunk_size=1
    ).margins([(QUERY, d) for d in [LONG_DOC, *SHORT_DOCS]])
    assert max(abs(a - b) for a, b in zip(together, reference, strict=True)) <= (
        MARGIN_ATOL
    )
    assert max(abs(a - b) for a, b in zip(after, reference[1:], strict=True)) <= 1e-5


def test_a_budget_that_cannot_fit_a_request_is_refused_before_the_engine_starts(
    tiny_checkpoint: Path,
) -> None:
    with pytest.raises(KaLMInputError, match="max_num_batched_tokens=2048") as error:
        KaLMVLLMReranker(
            str(tiny_checkpoint),
            dtype="float32",
            max_model_len=4000,
            max_num_batched_tokens=2048,
            **LONG,
        )
    assert "max_model_len=4000" in str(error.value)


@pytest.mark.server
def test_the_server_answers_a_long_request_and_the_short_ones_sent_after_it(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    server = kalm_serve(
        tiny_checkpoint,
        tmp_path,
        "--document-max-length",
        "3000",
        "--encoder-chunk-size",
        "1",
        "--dtype",
        "float32",
    )
    try:
        asyncio.run(_long_then_short(server.url))
    finally:
        server.stop()


async def _long_then_short(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=300) as http:
        health = (await http.get("/health")).json()
        assert health["max_num_batched_tokens"] >= health["max_model_len"] > 3000
        long = asyncio.create_task(
            http.post("/rerank", json={"query": QUERY, "documents": [LONG_DOC]})
        )
        await asyncio.sleep(0.2)  # the long request is queued first
        short = [
            asyncio.create_task(
                http.post("/rerank", json={"query": QUERY, "documents": SHORT_DOCS})
            )
            for _ in range(3)
        ]
        answers = await asyncio.gather(long, *short)
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert answers[0].json()["results"][0]["index"] == 0
