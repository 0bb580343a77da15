# SPDX-License-Identifier: Apache-2.0
"""The resumable reranking loop: one ``rank`` call per query and reranked run,
each finished query journaled before the next starts.

Fresh state per query: the encoder's float32 results depend (at ~1e-7) on
which passages it batched together, so a passage state reused from an earlier
query (the plugin's passage cache, vLLM's encoder cache) can differ in the last
bits from one encoded with this query's candidates. With the passage cache off
and vLLM's encoder cache emptied before each query, a query's scores depend on
that query alone, so a resumed run writes the same bytes as an uninterrupted
one. With the passage cache on, passages are reused across queries (faster when
candidates recur) and that guarantee is off.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kalm_t5gemma2_vllm_plugin.engine.vllm_compat import reset_encoder_cache
from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError
from kalm_t5gemma2_vllm_plugin.evaluation.journal import Journal, QueryScores
from kalm_t5gemma2_vllm_plugin.evaluation.runs import Candidates

__all__ = [
    "RerankStats",
    "fresh_state_per_query",
    "rerank_queries",
    "run_name",
]


def run_name(chunk_size: int | None) -> str:
    """The name of a reranked run: ``reranked``, or ``chunk_size=N`` in a sweep."""
    return "reranked" if chunk_size is None else f"chunk_size={chunk_size}"


def fresh_state_per_query(reranker: Any) -> bool:
    """Whether each query is scored from a fresh state (see the module
    docstring): the passage cache is off (vLLM's encoder cache is emptied
    before each query)."""
    return bool(reranker.settings.passage_cache_mb == 0)


@dataclass
class RerankStats:
    """What this process scored (a resumed run counts only its own work)."""

    #: Per reranked run: the keyword arguments its ``rank`` calls got.
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Each query scored from a fresh state (see the module docstring).
    fresh_state: bool = False
    queries: int = 0
    pairs: int = 0
    seconds: float = 0.0


def _rank_one(
    reranker: Any,
    query: str,
    doc_ids: list[str],
    corpus: Mapping[str, str] | None,
    keywords: Mapping[str, Any],
) -> dict[str, float]:
    if corpus is None:  # by id, from the passage store
        results = reranker.rank(query, document_ids=doc_ids, **keywords)
    else:
        results = reranker.rank(query, [corpus[d] for d in doc_ids], **keywords)
    return {doc_ids[r["corpus_id"]]: float(r["score"]) for r in results}


def rerank_queries(
    reranker: Any,
    queries: Mapping[str, str],
    candidates: Candidates,
    corpus: Mapping[str, str] | None,
    journal: Journal,
    runs: Mapping[str, Mapping[str, Any]],
    *,
    progress: bool | None = None,
) -> RerankStats:
    """Rerank every query of ``candidates`` that ``journal`` has not finished.

    Args:
        reranker: a started ``KaLMVLLMReranker``.
        queries: query id to text.
        candidates: the first stage's top documents per query (queries in id
            order are reranked in that order).
        corpus: document id to text; ``None``: documents go by id
            (``document_ids=``, from the reranker's passage store).
        journal: where each finished query is recorded (and what is skipped).
        runs: reranked run name to the extra ``rank`` keywords of that run
            (e.g. ``{"chunk_size=8": {"encoder_chunk_size": 8}}``).
        progress: a tqdm bar (queries/s) on stderr; ``None``: when a terminal.
    """
    from tqdm import tqdm

    todo = [q for q in sorted(candidates) if candidates[q]]
    remaining = [q for q in todo if q not in journal.done]
    fresh = fresh_state_per_query(reranker)
    stats = RerankStats({name: dict(kw) for name, kw in runs.items()}, fresh)
    bar = tqdm(
        total=len(todo),
        initial=len(todo) - len(remaining),
        unit=" queries",
        desc="reranking",
        file=sys.stderr,
        disable=(not sys.stderr.isatty()) if progress is None else not progress,
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    try:
        for query_id in remaining:
            if fresh and not reset_encoder_cache(reranker.llm):
                raise KaLMConfigError(
                    "This vLLM cannot empty its encoder cache between queries; "
                    "run with --passage-cache-mb > 0 (resumes may then differ in "
                    "the last bits)."
                )
            doc_ids = [doc for doc, _ in candidates[query_id]]
            scores: QueryScores = {
                name: _rank_one(reranker, queries[query_id], doc_ids, corpus, keywords)
                for name, keywords in runs.items()
            }
            journal.append(query_id, scores)
            stats.queries += 1
            stats.pairs += len(doc_ids) * len(runs)
            bar.update(1)
    finally:
        stats.seconds = time.perf_counter() - started
        bar.close()
    return stats
