# SPDX-License-Identifier: Apache-2.0
"""LlamaIndex's Cohere, Jina and TEI rerank postprocessors against kalm-vllm-serve."""

from __future__ import annotations

from collections.abc import Callable

from _harness import Report
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from llama_index.postprocessor.cohere_rerank import CohereRerank
from llama_index.postprocessor.jinaai_rerank import JinaRerank
from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

report = Report(
    [
        "llama-index-core",
        "llama-index-postprocessor-cohere-rerank",
        "llama-index-postprocessor-jinaai-rerank",
        "llama-index-postprocessor-tei-rerank",
    ]
)
spec = report.spec
url, key, model = spec["url"], spec["key"], spec["model"]
query, docs = spec["query"], spec["documents"]


def ranked(make: Callable[[], BaseNodePostprocessor]) -> list[tuple[int, float]]:
    # Fresh nodes each time: the postprocessors write scores into them.
    nodes = [
        NodeWithScore(node=TextNode(text=d, id_=str(i))) for i, d in enumerate(docs)
    ]
    out = make().postprocess_nodes(nodes, QueryBundle(query))
    return [(int(n.node.node_id), n.score) for n in out]


n = len(docs)
report.run(
    "cohere",
    lambda: ranked(
        lambda: CohereRerank(model=model, api_key=key, base_url=url, top_n=n)
    ),
)
report.run(
    "jina",
    lambda: ranked(
        lambda: JinaRerank(model=model, api_key=key, base_url=url + "/v1", top_n=n)
    ),
)
# TEI's client sends auth_token as the whole Authorization value.
report.run(
    "tei",
    lambda: ranked(
        lambda: TextEmbeddingInference(
            base_url=url, top_n=n, auth_token=f"Bearer {key}"
        )
    ),
)
report.run(
    "tei_top3",
    lambda: ranked(
        lambda: TextEmbeddingInference(
            base_url=url, top_n=3, auth_token=f"Bearer {key}"
        )
    ),
)
report.emit()
