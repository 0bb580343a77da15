# SPDX-License-Identifier: Apache-2.0
"""A first stage for users who have none: BM25 over the corpus (bm25s).

The index reads the same text the reranker reads (``beir.document_text``).
Every document's score is computed and the top ``depth`` are picked with ties
broken by document id, so the run is a pure function of the corpus and the
queries. Documents that share no term with the query (score 0) are not
retrieved, as in Lucene. bm25s imports numba, so the work runs in the helper
process of ``_worker`` (``bm25_run_here`` is what it runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError

__all__ = ["BM25_SETTINGS", "bm25_run", "bm25_run_file", "bm25_run_here"]

#: bm25s's defaults (Lucene's BM25), Lucene's 33 English stop words, no stemming.
BM25_SETTINGS: dict[str, Any] = {
    "method": "lucene",
    "k1": 1.5,
    "b": 0.75,
    "stopwords": "en",
    "stemmer": None,
}


def _bm25s() -> Any:
    try:
        import bm25s
    except ImportError as exc:
        raise KaLMConfigError(
            "The BM25 first stage needs bm25s: pip install "
            "'kalm-t5gemma2-vllm-plugin[eval]' (or pass --run FILE)."
        ) from exc
    return bm25s


def bm25_run(
    corpus: Mapping[str, str], queries: Mapping[str, str], depth: int
) -> dict[str, dict[str, float]]:
    """``{query id: {document id: BM25 score}}``, the best ``depth`` per query.

    Example:
        >>> bm25_run({"d1": "iron rusts", "d2": "bees make honey"},
        ...          {"q1": "why does iron rust"}, 10)
        {'q1': {'d1': 0.46...}}
    """
    from kalm_t5gemma2_vllm_plugin.evaluation import _worker

    run: dict[str, dict[str, float]] = _worker.call(
        "bm25_run", corpus=corpus, queries=queries, depth=depth
    )
    return run


def bm25_run_file(
    corpus_path: str, queries: Mapping[str, str], depth: int
) -> dict[str, dict[str, float]]:
    """``bm25_run`` over a BEIR ``corpus.jsonl``, which the helper process reads
    itself (a large corpus is not sent through a pipe)."""
    from kalm_t5gemma2_vllm_plugin.evaluation import _worker

    run: dict[str, dict[str, float]] = _worker.call(
        "bm25_run_file", corpus_path=corpus_path, queries=queries, depth=depth
    )
    return run


def bm25_run_file_here(
    corpus_path: str, queries: Mapping[str, str], depth: int
) -> dict[str, dict[str, float]]:
    from kalm_t5gemma2_vllm_plugin.evaluation.beir import read_corpus

    return bm25_run_here(read_corpus(corpus_path), queries, depth)


def bm25_run_here(
    corpus: Mapping[str, str], queries: Mapping[str, str], depth: int
) -> dict[str, dict[str, float]]:
    """``bm25_run`` in this process (imports numba)."""
    import numpy as np

    bm25s = _bm25s()
    doc_ids = list(corpus)
    if not doc_ids:
        return {query_id: {} for query_id in queries}
    settings = BM25_SETTINGS
    tokens = bm25s.tokenize(
        [corpus[i] for i in doc_ids],
        stopwords=settings["stopwords"],
        stemmer=settings["stemmer"],
        show_progress=False,
    )
    retriever = bm25s.BM25(
        method=settings["method"], k1=settings["k1"], b=settings["b"]
    )
    retriever.index(tokens, show_progress=False)
    # Position of each document in id order: the tie-break among equal scores.
    id_rank = np.empty(len(doc_ids), dtype=np.int64)
    id_rank[np.argsort(np.array(doc_ids, dtype=object), kind="stable")] = np.arange(
        len(doc_ids)
    )
    vocabulary = tokens.vocab
    run: dict[str, dict[str, float]] = {}
    for query_id, text in queries.items():
        words = bm25s.tokenize(
            text,
            stopwords=settings["stopwords"],
            stemmer=settings["stemmer"],
            return_ids=False,
            show_progress=False,
        )[0]
        known = [w for w in words if w in vocabulary]
        scores = (
            retriever.get_scores(known) if known else np.zeros(len(doc_ids))
        ).astype(np.float64)
        picked = _top(scores, id_rank, depth)
        run[query_id] = {doc_ids[i]: float(scores[i]) for i in picked}
    return run


def _top(scores: Any, id_rank: Any, depth: int) -> list[int]:
    """Indices of the best ``depth`` positive scores, best first, ties by id."""
    import numpy as np

    positive = np.flatnonzero(scores > 0)
    if len(positive) > depth:
        # The depth-th best score; everything above it is in, ties are cut by id.
        threshold = np.partition(scores[positive], len(positive) - depth)[
            len(positive) - depth
        ]
        positive = positive[scores[positive] >= threshold]
    order = np.lexsort((id_rank[positive], -scores[positive]))
    return [int(i) for i in positive[order][:depth]]
