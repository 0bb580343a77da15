# SPDX-License-Identifier: Apache-2.0
"""The cohere SDK (v2, v1 and async clients) against kalm-vllm-serve."""

from __future__ import annotations

import asyncio

import cohere
from _harness import Report

report = Report(["cohere"])
spec = report.spec
url, key, model = spec["url"], spec["key"], spec["model"]
query, docs = spec["query"], spec["documents"]


def v2(top_n: int | None) -> list[tuple[int, float]]:
    client = cohere.ClientV2(api_key=key, base_url=url)
    extra = {} if top_n is None else {"top_n": top_n}
    response = client.rerank(model=model, query=query, documents=docs, **extra)
    return [(r.index, r.relevance_score) for r in response.results]


def v1() -> list[tuple[int, float]]:
    client = cohere.Client(api_key=key, base_url=url)
    response = client.rerank(
        model=model, query=query, documents=docs, top_n=3, return_documents=False
    )
    return [(r.index, r.relevance_score) for r in response.results]


async def _concurrent() -> list[list[tuple[int, float]]]:
    client = cohere.AsyncClientV2(api_key=key, base_url=url)
    answers = await asyncio.gather(
        *(client.rerank(model=model, query=query, documents=docs) for _ in range(4))
    )
    return [[(r.index, r.relevance_score) for r in a.results] for a in answers]


def wrong_key() -> list[tuple[int, float]]:
    client = cohere.ClientV2(api_key=key + "-wrong", base_url=url)
    response = client.rerank(model=model, query=query, documents=docs)
    return [(r.index, r.relevance_score) for r in response.results]


report.run("v2", lambda: v2(len(docs)))
report.run("v2_top3", lambda: v2(3))
report.run("v2_default", lambda: v2(None))
report.run("v1_top3", v1)
report.run_each([f"async_v2_{i}" for i in range(4)], lambda: asyncio.run(_concurrent()))
report.run("wrong_key", wrong_key)
report.emit()
