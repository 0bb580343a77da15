# SPDX-License-Identifier: Apache-2.0
"""LangChain: langchain-cohere's CohereRerank (alone and in a compression
retriever) and langchain-community's JinaRerank against kalm-vllm-serve."""

from __future__ import annotations

import langchain_community.document_compressors.jina_rerank as jina_rerank
from _harness import Report
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_cohere import CohereRerank
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

report = Report(
    [
        "langchain-cohere",
        "langchain-community",
        "langchain-classic",
        "langchain-core",
        "cohere",
    ]
)
spec = report.spec
url, key, model = spec["url"], spec["key"], spec["model"]
query, docs = spec["query"], spec["documents"]


class FixedRetriever(BaseRetriever):
    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        return [Document(page_content=d, metadata={"i": i}) for i, d in enumerate(docs)]


def cohere(top_n: int | None) -> list[tuple[int, float]]:
    extra = {} if top_n is None else {"top_n": top_n}
    reranker = CohereRerank(model=model, base_url=url, cohere_api_key=key, **extra)
    return [(r["index"], r["relevance_score"]) for r in reranker.rerank(docs, query)]


def retriever() -> list[tuple[int, float]]:
    compressor = CohereRerank(model=model, base_url=url, cohere_api_key=key, top_n=5)
    chain = ContextualCompressionRetriever(
        base_compressor=compressor, base_retriever=FixedRetriever()
    )
    found = chain.invoke(query)
    return [(d.metadata["i"], d.metadata["relevance_score"]) for d in found]


def jina() -> list[tuple[int, float]]:
    # The class has no URL parameter; its module constant is the documented tweak.
    jina_rerank.JINA_API_URL = url + "/v1/rerank"
    reranker = jina_rerank.JinaRerank(model=model, jina_api_key=key, top_n=len(docs))
    return [(r["index"], r["relevance_score"]) for r in reranker.rerank(docs, query)]


report.run("cohere", lambda: cohere(len(docs)))
report.run("cohere_default_top3", lambda: cohere(None))
report.run("compression_retriever_top5", retriever)
report.run("jina", jina)
report.emit()
