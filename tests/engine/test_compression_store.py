# SPDX-License-Identifier: Apache-2.0
"""Per-request compression against engines started at the coarse size, one
store serving coarser engines, and long documents stored as windows (each
test builds its own engines, one at a time; see the root conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin import DocumentId, KaLMVLLMReranker
from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError
from kalm_t5gemma2_vllm_plugin.store.format import PassageStore
from kalm_t5gemma2_vllm_plugin.windows import split_document
from tests.helpers import QUERY, run_encode, write_corpus

pytestmark = pytest.mark.engine

LIMIT = 64
DOCS = {f"d{i}": synthetic_text(23 + 37 * i, seed=200 + i) for i in range(6)}
ATOL = 1e-4


def _margins(reranker: KaLMVLLMReranker, **options: object) -> list[float]:
    return reranker.margins([(QUERY, d) for d in DOCS.values()], **options)  # type: ignore[arg-type]


def _close(got: list[float], want: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(got, want, strict=True))


def test_per_request_compression_equals_an_engine_started_at_that_size(
    tiny_checkpoint: Path,
) -> None:
    with KaLMVLLMReranker(
        str(tiny_checkpoint), dtype="float32", document_max_length=LIMIT
    ) as fine:
        repooled = {n: _margins(fine, encoder_chunk_size=n) for n in (16, 32)}
    for n, got in repooled.items():
        with KaLMVLLMReranker(
            str(tiny_checkpoint),
            dtype="float32",
            document_max_length=LIMIT,
            encoder_chunk_size=n,
        ) as coarse:
            assert _close(got, _margins(coarse)) <= ATOL


def test_one_store_at_chunk_4_serves_engines_at_its_multiples(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    corpus = write_corpus(tmp_path / "c.jsonl", DOCS)
    run_encode(
        tiny_checkpoint,
        corpus,
        store,
        "--encoder-chunk-size",
        "4",
        "--document-max-length",
        str(LIMIT),
    )
    ids = [DocumentId(i) for i in DOCS]
    with KaLMVLLMReranker(
        str(tiny_checkpoint),
        dtype="float32",
        document_max_length=LIMIT,
        encoder_chunk_size=8,
        passage_store=str(store),
    ) as engine:
        by_id = engine.margins([(QUERY, i) for i in ids])
        by_id_16 = engine.margins([(QUERY, i) for i in ids], encoder_chunk_size=16)
        by_text = _margins(engine)  # encoded here, at 8
        by_text_16 = _margins(engine, encoder_chunk_size=16)
        stats = engine.stats()
    # stored states travel with each request: once at 8, once for 16
    assert stats["passages_from_store"] == 2 * len(DOCS)
    assert stats["passages_encoded"] == len(DOCS)  # the text ones, once
    assert _close(by_id, by_text) <= ATOL
    assert _close(by_id_16, by_text_16) <= ATOL
    # an engine finer than the store, or not a multiple of it, is refused
    with pytest.raises(KaLMConfigError, match="finer chunk size whose multiple"):
        KaLMVLLMReranker(
            str(tiny_checkpoint),
            dtype="float32",
            document_max_length=LIMIT,
            encoder_chunk_size=2,
            passage_store=str(store),
        )


def test_a_long_document_stored_as_windows_scores_as_its_text(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    docs = {"long": synthetic_text(400, seed=300), "short": "A short one.", **DOCS}
    store = tmp_path / "store"
    corpus = write_corpus(tmp_path / "c.jsonl", docs)
    done = run_encode(
        tiny_checkpoint,
        corpus,
        store,
        "--document-max-length",
        str(LIMIT),
        "--long-document",
        "max",
        "--window-overlap",
        "12",
    )
    summary = json.loads(done.stdout)
    opened = PassageStore(store)
    windows = opened.window_records(["long", "short"])
    assert len(opened) == len(docs) and summary["windows"] > len(docs)
    assert len(windows["long"]) > 5 and len(windows["short"]) == 1
    assert [r.window for r in windows["long"]] == list(range(len(windows["long"])))
    opened.close()
    with KaLMVLLMReranker(
        str(tiny_checkpoint),
        dtype="float32",
        document_max_length=LIMIT,
        passage_store=str(store),
    ) as engine:
        for policy in ("max", "mean"):
            by_id = engine.rank(
                QUERY,
                document_ids=list(docs),
                long_document=policy,
                return_margin=True,
            )
            by_text = engine.rank(
                QUERY,
                list(docs.values()),
                long_document=policy,
                window_overlap=12,
                return_margin=True,
            )
            assert [r["corpus_id"] for r in by_id] == [r["corpus_id"] for r in by_text]
            for a, b in zip(by_id, by_text, strict=True):
                assert abs(a["margin"] - b["margin"]) <= 1e-5
                assert a["windows"] == b["windows"]
                assert a["best_window"] == b["best_window"]
        # truncate by id: the document's first window
        head = engine.margins([(QUERY, DocumentId("long"))])
        first = split_document(
            engine.tokenizer, docs["long"], limit=LIMIT, overlap=12, max_windows=32
        )[0]
        assert _close(head, engine.margins([(QUERY, first.text)])) <= 1e-5


def test_re_encoding_as_windows_replaces_the_stored_head(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    docs = {"long": synthetic_text(400, seed=301), "short": "Short."}
    store = tmp_path / "store"
    corpus = write_corpus(tmp_path / "c.jsonl", docs)
    args = ("--document-max-length", str(LIMIT))
    first = json.loads(run_encode(tiny_checkpoint, corpus, store, *args).stdout)
    again = json.loads(
        run_encode(
            tiny_checkpoint, corpus, store, *args, "--long-document", "max"
        ).stdout
    )
    # only the document whose head was cut is encoded again, now as windows
    assert first["encoded"] == 2 and again["encoded"] == 1 and again["skipped"] == 1
    opened = PassageStore(store)
    assert len(opened.window_records(["long"])["long"]) > 5
    assert len(opened) == 2
    opened.close()
