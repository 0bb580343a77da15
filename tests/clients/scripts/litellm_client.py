# SPDX-License-Identifier: Apache-2.0
"""LiteLLM's rerank() through its cohere, jina_ai, hosted_vllm, infinity and
huggingface (TEI) providers against kalm-vllm-serve."""

from __future__ import annotations

import asyncio
import os
from typing import Any

# No network here: the cost map ships with the package.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import litellm  # noqa: E402
from _harness import Report  # noqa: E402

report = Report(["litellm"])
spec = report.spec
url, key, model = spec["url"], spec["key"], spec["model"]
query, docs = spec["query"], spec["documents"]


def ranked(response: Any) -> list[tuple[int, float]]:
    return [(r["index"], r["relevance_score"]) for r in response.results]


def rerank(provider: str, api_base: str = url, **extra: Any) -> list[tuple[int, float]]:
    extra.setdefault("top_n", len(docs))
    return ranked(
        litellm.rerank(
            model=f"{provider}/{model}",
            api_base=api_base,
            api_key=extra.pop("api_key", key),
            query=query,
            documents=docs,
            **extra,
        )
    )


async def _arerank() -> list[tuple[int, float]]:
    response = await litellm.arerank(
        model=f"cohere/{model}", api_base=url, api_key=key, query=query, documents=docs
    )
    return ranked(response)


report.run("cohere", lambda: rerank("cohere"))
report.run("cohere_top3", lambda: rerank("cohere", top_n=3))
report.run("cohere_v1", lambda: rerank("cohere", url + "/v1/rerank"))
report.run("cohere_async", lambda: asyncio.run(_arerank()))
report.run("jina_ai", lambda: rerank("jina_ai"))
report.run("hosted_vllm", lambda: rerank("hosted_vllm"))
# Infinity answers "document": "<text>", we answer {"text": ...}: the documented tweak.
report.run("infinity", lambda: rerank("infinity", return_documents=False))
report.run("huggingface_tei", lambda: rerank("huggingface"))
report.run("huggingface_tei_top3", lambda: rerank("huggingface", top_n=3))
report.run("wrong_key", lambda: rerank("cohere", api_key=key + "-wrong"))
report.emit()
