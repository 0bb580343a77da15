# SPDX-License-Identifier: Apache-2.0
"""``evaluate()`` on one shared engine (the tiny checkpoint, float32): the
reranked run holds exactly what ``KaLMVLLMReranker.rank`` returns, documents by
id score as text, and the chunk-size sweep compares sizes on one engine.

The tiny checkpoint is random: these tests check plumbing, never quality.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError
from kalm_t5gemma2_vllm_plugin.evaluation import (
    evaluate,
    evaluate_run,
    read_corpus,
    read_qrels,
    read_queries,
    read_run,
    top_candidates,
)
from kalm_t5gemma2_vllm_plugin.rerankers.vllm import KaLMVLLMReranker
from tests.helpers import run_encode, write_corpus

pytestmark = [pytest.mark.eval, pytest.mark.engine]

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "beir-fixture"
RUN = FIXTURE / "run.dice.trec"
#: |score difference| between the reranked run file and a direct rank() call.
SCORE_ATOL = 1e-6
#: Documents by id (stored states) against the same documents as text.
STORE_ATOL = 1e-5

QUERIES = read_queries(FIXTURE / "queries.jsonl")
CORPUS = read_corpus(FIXTURE / "corpus.jsonl")


@pytest.fixture(scope="module")
def fixture_store(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The fixture's corpus encoded by kalm-vllm-encode (before the shared
    engine starts: one in-process engine at a time)."""
    root = tmp_path_factory.mktemp("eval-store")
    corpus = write_corpus(root / "corpus.jsonl", CORPUS)
    run_encode(tiny_checkpoint, corpus, root / "store")
    return root / "store"


@pytest.fixture(scope="module")
def reranker(tiny_checkpoint: Path, fixture_store: Path) -> Iterator[KaLMVLLMReranker]:
    with KaLMVLLMReranker(
        str(tiny_checkpoint), dtype="float32", passage_store=fixture_store
    ) as rr:
        yield rr


def _direct(
    rr: KaLMVLLMReranker, query_id: str, doc_ids: list[str], **keywords: object
) -> dict[str, float]:
    results = rr.rank(QUERIES[query_id], [CORPUS[d] for d in doc_ids], **keywords)
    return {doc_ids[r["corpus_id"]]: r["score"] for r in results}


def _candidates(depth: int) -> dict[str, list[str]]:
    dice = read_run(RUN, QUERIES).scores
    qrels = read_qrels(FIXTURE / "qrels" / "test.tsv")
    cut = top_candidates({q: dice.get(q, {}) for q in qrels}, depth)
    return {q: [d for d, _ in docs] for q, docs in cut.items() if docs}


def test_reranked_run_scores_equal_direct_rank_scores(
    reranker: KaLMVLLMReranker, tmp_path: Path
) -> None:
    report = evaluate(
        FIXTURE, tmp_path, reranker=reranker, run=RUN, depth=20, plot=False
    )
    candidates = _candidates(20)
    written = read_run(tmp_path / "run.reranked.trec", QUERIES).scores
    assert set(written) == set(candidates)
    for query_id, doc_ids in candidates.items():
        direct = _direct(reranker, query_id, doc_ids)
        assert set(written[query_id]) == set(direct)
        for doc_id, score in direct.items():
            assert written[query_id][doc_id] == pytest.approx(score, abs=SCORE_ATOL)
    assert report["queries_evaluated"] == 30
    assert report["dataset"]["queries_skipped"] == 2
    assert report["queries_reranked"] == len(candidates)
    assert report["queries_scored_this_run"] == len(candidates)
    assert report["pairs_scored"] == sum(len(d) for d in candidates.values())
    assert report["dataset"]["queries_without_candidates"] == 30 - len(candidates)
    engine = report["engine"]
    assert engine["dtype"] == "float32" and engine["encoder_chunk_size"] == 4
    # this engine keeps its passage cache: states are reused across queries
    assert report["fresh_state_per_query"] is False
    assert any("Passage states were reused" in n for n in report["notes"])
    assert engine["document_max_length"] == reranker.settings.document_max_length
    # the report's numbers are those of the files it wrote
    qrels = read_qrels(FIXTURE / "qrels" / "test.tsv")
    means, _ = evaluate_run(qrels, written)
    for metric, value in means.items():
        assert report["metrics"]["reranked"][metric] == pytest.approx(value, abs=1e-12)
    stored = json.loads((tmp_path / "report.json").read_text())
    assert stored["metrics"] == report["metrics"]


def test_a_second_call_resumes_everything_from_the_journal(
    reranker: KaLMVLLMReranker, tmp_path: Path
) -> None:
    first = evaluate(FIXTURE, tmp_path, reranker=reranker, run=RUN, depth=5, plot=False)
    before = (tmp_path / "run.reranked.trec").read_bytes()
    again = evaluate(FIXTURE, tmp_path, reranker=reranker, run=RUN, depth=5, plot=False)
    assert again["queries_scored_this_run"] == 0
    assert again["queries_resumed"] == first["queries_reranked"]
    assert (tmp_path / "run.reranked.trec").read_bytes() == before


def test_documents_by_id_score_as_their_text(
    reranker: KaLMVLLMReranker, fixture_store: Path, tmp_path: Path
) -> None:
    report = evaluate(
        FIXTURE,
        tmp_path,
        reranker=reranker,
        run=RUN,
        depth=10,
        passage_store=fixture_store,
        plot=False,
    )
    assert report["dataset"]["document_text"].startswith("by id from the passage store")
    written = read_run(tmp_path / "run.reranked.trec", QUERIES).scores
    for query_id, doc_ids in _candidates(10).items():
        for doc_id, score in _direct(reranker, query_id, doc_ids).items():
            assert written[query_id][doc_id] == pytest.approx(score, abs=STORE_ATOL)


def test_ids_missing_from_the_store_are_named(
    reranker: KaLMVLLMReranker, fixture_store: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"q01": {"doc001": 2.0, "ghost-1": 1.0, "ghost-2": 0.5}}))
    message = (
        f"2 candidate document(s) are not in the passage store {fixture_store}: "
        "ghost-1, ghost-2 (first: 'ghost-1' for query 'q01')"
    )
    with pytest.raises(KaLMInputError, match=re.escape(message)):
        evaluate(
            FIXTURE,
            tmp_path / "out",
            reranker=reranker,
            run=run,
            passage_store=fixture_store,
        )


def test_a_sweep_needs_the_engine_at_its_finest_size(
    reranker: KaLMVLLMReranker, tmp_path: Path
) -> None:
    message = (
        "chunk_size_sweep [8, 16] needs an engine at its finest size 8; this "
        "reranker's encoder chunk size is 4."
    )
    with pytest.raises(KaLMInputError, match=re.escape(message)):
        evaluate(
            FIXTURE, tmp_path, reranker=reranker, run=RUN, chunk_size_sweep=[16, 8]
        )


def test_chunk_size_sweep_on_one_engine(
    reranker: KaLMVLLMReranker, tmp_path: Path
) -> None:
    report = evaluate(
        FIXTURE,
        tmp_path,
        reranker=reranker,
        run=RUN,
        depth=8,
        chunk_size_sweep=[16, 4, 8],
    )
    assert report["chunk_size_sweep"] == [4, 8, 16]
    assert set(report["metrics"]) == {
        "first_stage",
        "chunk_size=4",
        "chunk_size=8",
        "chunk_size=16",
    }
    assert report["rank_keywords"] == {
        "chunk_size=4": {},
        "chunk_size=8": {"encoder_chunk_size": 8},
        "chunk_size=16": {"encoder_chunk_size": 16},
    }
    assert (tmp_path / "chunk_size_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| chunk size 16 |" in (tmp_path / "report.md").read_text()
    for size in (4, 8, 16):
        written = read_run(tmp_path / f"run.reranked.chunk{size}.trec", QUERIES).scores
        keywords = {} if size == 4 else {"encoder_chunk_size": size}
        for query_id, doc_ids in _candidates(8).items():
            direct = _direct(reranker, query_id, doc_ids, **keywords)
            for doc_id, score in direct.items():
                assert written[query_id][doc_id] == pytest.approx(score, abs=SCORE_ATOL)


def test_long_document_policy_passes_through(
    reranker: KaLMVLLMReranker, tmp_path: Path
) -> None:
    report = evaluate(
        FIXTURE, tmp_path, reranker=reranker, run=RUN, depth=3, long_document="max",
        plot=False,
    )  # fmt: skip
    assert report["engine"]["long_document"] == "max"
    assert report["rank_keywords"] == {"reranked": {"long_document": "max"}}
    written = read_run(tmp_path / "run.reranked.trec", QUERIES).scores
    for query_id, doc_ids in _candidates(3).items():
        direct = _direct(reranker, query_id, doc_ids, long_document="max")
        for doc_id, score in direct.items():
            assert written[query_id][doc_id] == pytest.approx(score, abs=SCORE_ATOL)
