# SPDX-License-Identifier: Apache-2.0
"""The rerankers library's API rankers (cohere, jina, text-embeddings-inference)
against kalm-vllm-serve."""

from __future__ import annotations

from _harness import Report
from rerankers import Reranker

report = Report(["rerankers"])
spec = report.spec
url, key, model = spec["url"], spec["key"], spec["model"]
query, docs = spec["query"], spec["documents"]


def ranked(provider: str, endpoint: str) -> list[tuple[int, float]]:
    # model_type= plus the undocumented url= is the documented tweak: the
    # README's api_provider= builds a local model for a name without "cohere".
    ranker = Reranker(
        model, model_type=provider, api_key=key, url=url + endpoint, verbose=0
    )
    results = ranker.rank(query, docs, doc_ids=list(range(len(docs))))
    return [(r.document.doc_id, r.score) for r in results.results]


report.run("cohere_v1", lambda: ranked("cohere", "/v1/rerank"))
report.run("cohere_v2", lambda: ranked("cohere", "/v2/rerank"))
report.run("jina", lambda: ranked("jina", "/v1/rerank"))
report.run("tei", lambda: ranked("text-embeddings-inference", "/rerank"))
report.emit()
