# SPDX-License-Identifier: Apache-2.0
"""Passage reuse at top-100 size: the plugin's passage cache behind vLLM's
encoder cache (each test builds its own engine; see the root conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin import DocumentId, KaLMReranker, KaLMVLLMReranker
from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from tests.helpers import MARGIN_ATOL, QUERY, run_encode, write_corpus

pytestmark = pytest.mark.engine

#: 100 candidates of ~250 tokens (~63 pooled rows each at chunk 4): more than
#: vLLM's encoder cache keeps.
DOCS = [synthetic_text(250, seed=1000 + i) for i in range(100)]
QUERIES = [QUERY, "Where is the largest city?", "Which river is the longest?"]


def _rank_all(reranker: KaLMVLLMReranker) -> list[list[float]]:
    return [reranker.margins([(q, d) for d in DOCS]) for q in QUERIES]


def test_three_queries_over_100_documents_encode_each_passage_once(
    tiny_checkpoint: Path,
) -> None:
    with KaLMVLLMReranker(str(tiny_checkpoint), dtype="float32") as reranker:
        cached = _rank_all(reranker)
        stats = reranker.stats()
    print(f"\ndefault settings, 3 queries x 100 documents: {stats}")
    assert stats["passages_encoded"] == 100
    assert stats["requests_scored"] == 300
    # the same passage from the encoder or a cache: the same margins
    with KaLMVLLMReranker(
        str(tiny_checkpoint), dtype="float32", passage_cache_mb=0
    ) as reranker:
        fresh = [reranker.margins([(q, d) for d in DOCS]) for q in QUERIES[1:]]
    for got, want in zip(cached[1:], fresh, strict=True):
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-6
    # and the passages served by the cache score as the fp32 reference does
    reference = KaLMReranker(str(tiny_checkpoint), dtype="float32")
    for query, got in zip(QUERIES[1:], cached[1:], strict=True):
        want = reference.margins([(query, d) for d in DOCS])
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= MARGIN_ATOL


def test_with_vllms_encoder_cache_small_the_plugin_cache_serves_the_repeats(
    tiny_checkpoint: Path,
) -> None:
    # vLLM sizes its encoder cache by the token budget: 2048 pooled rows hold
    # about 32 of these passages, and 100 visited in the same order each query
    # miss it every time (LRU), so every repeat reaches the plugin's cache.
    with KaLMVLLMReranker(
        str(tiny_checkpoint), dtype="float32", max_num_batched_tokens=2048
    ) as reranker:
        _rank_all(reranker)
        stats = reranker.stats()
    print(f"\nvLLM encoder cache of 2048 rows: {stats}")
    assert stats["passage_cache_misses"] == 100
    assert stats["passage_cache_hits"] == 200
    assert stats["passages_encoded"] == 100
    assert stats["passage_cache_evictions"] == 0
    assert 0 < stats["passage_cache_bytes"] <= 1024 * 2**20


def test_a_cache_smaller_than_the_candidates_evicts_and_stays_within_its_size(
    tiny_checkpoint: Path,
) -> None:
    # ~63 rows x 64 values x 4 B = ~16 KiB a passage: 0.8 MiB holds about half.
    with KaLMVLLMReranker(
        str(tiny_checkpoint),
        dtype="float32",
        max_num_batched_tokens=2048,
        passage_cache_mb=0.8,
    ) as reranker:
        _rank_all(reranker)
        stats = reranker.stats()
    print(f"\nplugin cache of 0.8 MiB: {stats}")
    assert stats["passage_cache_evictions"] > 0
    assert stats["passage_cache_bytes"] <= 0.8 * 2**20
    assert stats["passages_encoded"] > 100  # what was evicted is encoded again


def test_the_same_passage_by_id_and_then_as_text_is_not_encoded_again(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    docs = {f"d{i}": text for i, text in enumerate(DOCS[:5])}
    store = tmp_path / "store"
    run_encode(tiny_checkpoint, write_corpus(tmp_path / "c.jsonl", docs), store)
    with KaLMVLLMReranker(
        str(tiny_checkpoint), dtype="float32", passage_store=str(store)
    ) as reranker:
        by_id = reranker.margins([(QUERY, DocumentId(i)) for i in docs])
        by_text = reranker.margins([(QUERY, text) for text in docs.values()])
        stats = reranker.stats()
    # the store row carries the passage key: text finds the stored states
    assert stats["passages_encoded"] == 0 and stats["passages_from_store"] == 5
    assert max(abs(a - b) for a, b in zip(by_id, by_text, strict=True)) <= 1e-6
    want = KaLMReranker(str(tiny_checkpoint), dtype="float32").margins(
        [(QUERY, text) for text in docs.values()]
    )
    assert max(abs(a - b) for a, b in zip(by_text, want, strict=True)) <= MARGIN_ATOL
