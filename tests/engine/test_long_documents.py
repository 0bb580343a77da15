# SPDX-License-Identifier: Apache-2.0
"""Long documents as windows and per-request compression on one engine,
against the fp32 reference (document limit 64 tokens, so ordinary test texts
span several windows)."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin import KaLMReranker, KaLMVLLMReranker
from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError, TooManyItemsError
from kalm_t5gemma2_vllm_plugin.windows import split_document
from tests.helpers import QUERY

pytestmark = pytest.mark.engine

LIMIT = 64
OVERLAP = 12
#: Two long documents and one that fits a window; lengths not multiples of 4.
DOCS = [synthetic_text(301, seed=71), synthetic_text(143, seed=72), "Short one."]
WINDOW_ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Iterator[KaLMVLLMReranker]:
    with KaLMVLLMReranker(
        str(tiny_checkpoint), dtype="float32", document_max_length=LIMIT
    ) as reranker:
        yield reranker


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint: Path) -> KaLMReranker:
    return KaLMReranker(str(tiny_checkpoint), dtype="float32", max_length=LIMIT)


def _windows(engine: KaLMVLLMReranker, document: str):  # type: ignore[no-untyped-def]
    return split_document(
        engine.tokenizer, document, limit=LIMIT, overlap=OVERLAP, max_windows=32
    )


def test_max_scores_every_window_as_the_reference_scores_its_text(
    engine: KaLMVLLMReranker, oracle: KaLMReranker
) -> None:
    results = engine.rank(
        QUERY, DOCS, long_document="max", window_overlap=OVERLAP, return_margin=True
    )
    by_doc = {r["corpus_id"]: r for r in results}
    assert [len(_windows(engine, d)) for d in DOCS][:2] == [
        by_doc[0]["windows"],
        by_doc[1]["windows"],
    ]
    for index, document in enumerate(DOCS):
        windows = _windows(engine, document)
        want = oracle.margins([(QUERY, w.text) for w in windows])
        got = engine.margins([(QUERY, w.text) for w in windows])
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= WINDOW_ATOL
        best = max(range(len(want)), key=want.__getitem__)
        result = by_doc[index]
        assert abs(result["margin"] - max(want)) <= WINDOW_ATOL
        assert result["windows"] == len(windows)
        assert result["best_window"] == {
            "token_start": windows[best].token_start,
            "token_end": windows[best].token_end,
        }
    assert by_doc[0]["windows"] > 3 and by_doc[2]["windows"] == 1
    # the order is by the documents' best windows
    assert [r["corpus_id"] for r in results] == sorted(
        by_doc, key=lambda i: -by_doc[i]["margin"]
    )


def test_mean_is_the_mean_window_margin_and_the_reference_agrees(
    engine: KaLMVLLMReranker, oracle: KaLMReranker
) -> None:
    got = engine.predict(
        [(QUERY, d) for d in DOCS],
        long_document="mean",
        window_overlap=OVERLAP,
        return_margin=True,
    )
    # the reference implements the same policies (one contract)
    want = oracle.predict(
        [(QUERY, d) for d in DOCS],
        long_document="mean",
        window_overlap=OVERLAP,
        return_margin=True,
    )
    for document, g, w in zip(DOCS, got, want, strict=True):
        windows = _windows(engine, document)
        each = oracle.margins([(QUERY, x.text) for x in windows])
        assert abs(g["margin"] - sum(each) / len(each)) <= WINDOW_ATOL
        assert abs(g["margin"] - w["margin"]) <= WINDOW_ATOL
        assert g["windows"] == w["windows"] == len(windows)
        assert g["best_window"] == w["best_window"]


def test_truncate_is_the_default_and_reports_no_windows(
    engine: KaLMVLLMReranker, oracle: KaLMReranker
) -> None:
    results = engine.rank(QUERY, DOCS, return_margin=True)
    assert all("windows" not in r for r in results)
    want = oracle.margins([(QUERY, d) for d in DOCS])
    for r in results:
        assert abs(r["margin"] - want[r["corpus_id"]]) <= WINDOW_ATOL


def test_too_many_windows_names_the_document(engine: KaLMVLLMReranker) -> None:
    with pytest.raises(TooManyItemsError, match="more than 2 windows") as info:
        engine.rank(
            QUERY, ["short", DOCS[0]], long_document="max", max_windows_per_document=2
        )
    assert info.value.field == "documents.1"
    with pytest.raises(KaLMInputError, match="long_document must be one of"):
        engine.rank(QUERY, DOCS, long_document="first")


@pytest.mark.parametrize("coarse", [8, 16, 32])
def test_a_coarser_request_chunk_size_equals_pooling_at_that_size(
    engine: KaLMVLLMReranker, tiny_checkpoint: Path, coarse: int
) -> None:
    pairs = [(QUERY, d) for d in DOCS]
    default = engine.margins(pairs)
    before = engine.stats()["passages_encoded"]
    first = engine.margins(pairs, encoder_chunk_size=coarse)
    again = engine.margins(pairs, encoder_chunk_size=coarse)  # from the caches
    # the states at the engine's chunk size are re-pooled, never re-encoded
    assert engine.stats()["passages_encoded"] == before
    want = KaLMReranker(
        str(tiny_checkpoint), dtype="float32", max_length=LIMIT, chunk_size=coarse
    ).margins(pairs)
    for got in (first, again):
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= WINDOW_ATOL
    # and it differs from the engine's own chunk size (the test can fail)
    assert max(abs(a - b) for a, b in zip(default, want, strict=True)) > 1e-3


def test_windows_and_compression_together(
    engine: KaLMVLLMReranker, tiny_checkpoint: Path
) -> None:
    got = engine.rank(
        QUERY,
        DOCS,
        long_document="max",
        window_overlap=OVERLAP,
        encoder_chunk_size=16,
        return_margin=True,
    )
    want = KaLMReranker(
        str(tiny_checkpoint), dtype="float32", max_length=LIMIT, chunk_size=16
    ).rank(QUERY, DOCS, long_document="max", window_overlap=OVERLAP, return_margin=True)
    assert [r["corpus_id"] for r in got] == [r["corpus_id"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert abs(g["margin"] - w["margin"]) <= WINDOW_ATOL
        assert g["best_window"] == w["best_window"]


def test_finer_and_untrained_chunk_sizes_are_refused(engine: KaLMVLLMReranker) -> None:
    with pytest.raises(KaLMInputError, match="finer than this engine's chunk size 4"):
        engine.margins([(QUERY, "text")], encoder_chunk_size=2)
    with pytest.raises(KaLMInputError, match="trained for Matryoshka compression"):
        engine.margins([(QUERY, "text")], encoder_chunk_size=64)


def _peak_rss_mb() -> float:
    """The process's peak RSS since the last reset (``_reset_peak``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def test_a_document_20x_the_limit_ranks_in_bounded_memory(
    engine: KaLMVLLMReranker,
) -> None:
    # The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so
    # this process's peak RSS is the engine's.
    one = synthetic_text(LIMIT - 8, seed=90)
    long = synthetic_text(20 * LIMIT, seed=91)
    engine.rank("warm up", [synthetic_text(LIMIT - 8, seed=89)])
    _reset_peak()
    engine.rank(QUERY, [one], long_document="max")
    peak_one = _peak_rss_mb()
    _reset_peak()
    results = engine.rank(QUERY, [long], long_document="max")
    peak_long = _peak_rss_mb()
    print(f"\npeak RSS: 1x document {peak_one:.0f} MB, 20x {peak_long:.0f} MB")
    assert results[0]["windows"] >= 20
    assert peak_long < 1.10 * peak_one
