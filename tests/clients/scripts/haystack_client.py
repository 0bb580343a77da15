# SPDX-License-Identifier: Apache-2.0
"""Haystack's CohereRanker, JinaRanker and HuggingFaceTEIRanker against
kalm-vllm-serve."""

from __future__ import annotations

import asyncio
from typing import Any

from _harness import Report
from haystack import Document
from haystack.utils import Secret
from haystack_integrations.components.rankers.cohere import CohereRanker
from haystack_integrations.components.rankers.huggingface_api import (
    HuggingFaceTEIRanker,
    TruncationDirection,
)
from haystack_integrations.components.rankers.jina import JinaRanker

report = Report(
    ["haystack-ai", "cohere-haystack", "jina-haystack", "huggingface-api-haystack"]
)
spec = report.spec
url, key, model = spec["url"], spec["key"], spec["model"]
query, docs = spec["query"], spec["documents"]
token = Secret.from_token(key)
n = len(docs)


def ranked(result: dict[str, Any]) -> list[tuple[int, float]]:
    return [(int(d.id), d.score) for d in result["documents"]]


def documents() -> list[Document]:
    return [Document(id=str(i), content=d) for i, d in enumerate(docs)]


def cohere_async() -> list[tuple[int, float]]:
    ranker = CohereRanker(model=model, api_key=token, api_base_url=url, top_k=n)
    return ranked(asyncio.run(ranker.run_async(query=query, documents=documents())))


def tei(**options: Any) -> list[tuple[int, float]]:
    direction = options.pop("truncation_direction", None)
    ranker = HuggingFaceTEIRanker(url=url, top_k=n, token=token, **options)
    extra = {} if direction is None else {"truncation_direction": direction}
    return ranked(ranker.run(query=query, documents=documents(), **extra))


report.run(
    "cohere",
    lambda: ranked(
        CohereRanker(model=model, api_key=token, api_base_url=url, top_k=n).run(
            query=query, documents=documents()
        )
    ),
)
report.run("cohere_async", cohere_async)
report.run(
    "jina",
    lambda: ranked(
        JinaRanker(model=model, api_key=token, base_url=url + "/v1/rerank").run(
            query=query, documents=documents()
        )
    ),
)
report.run("tei", tei)
report.run("tei_raw_scores", lambda: tei(raw_scores=True))
report.run("tei_right", lambda: tei(truncation_direction=TruncationDirection.RIGHT))
report.run("tei_left", lambda: tei(truncation_direction=TruncationDirection.LEFT))
report.emit()
