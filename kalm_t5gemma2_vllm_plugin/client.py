# SPDX-License-Identifier: Apache-2.0
"""``KaLMRerankClient`` and ``kalm-vllm-client``: talk to ``kalm-vllm-serve``.

Light tier: httpx only (no torch, no vLLM). Requests go to the given host only:
proxy settings from the environment are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from kalm_t5gemma2_vllm_plugin.constants import (
    SAMPLE_DOCUMENTS,
    SAMPLE_QUERY,
)
from kalm_t5gemma2_vllm_plugin.errors import KaLMHTTPError

__all__ = ["DEMO_PAYLOADS", "KaLMRerankClient"]

DEMO_PAYLOADS: dict[str, dict[str, Any]] = {
    "rerank": {"query": SAMPLE_QUERY, "documents": list(SAMPLE_DOCUMENTS)},
    "score": {
        "pairs": [
            {"id": "positive", "query": SAMPLE_QUERY, "document": SAMPLE_DOCUMENTS[0]},
            {"id": "negative", "query": SAMPLE_QUERY, "document": SAMPLE_DOCUMENTS[1]},
        ]
    },
}


class KaLMRerankClient:
    """A small client for the KaLM HTTP service.

    Args:
        base_url: server address, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer <key>`` when given.
        timeout: seconds per request.
        transport: an httpx transport (tests inject ``ASGITransport``).

    Example:
        >>> client = KaLMRerankClient("http://127.0.0.1:8000")
        >>> result = client.rerank("What is the capital of China?",
        ...                        ["The capital of China is Beijing.", "Gravity."])
        >>> result["results"][0]
        {'index': 0, 'score': 0.9998..., 'relevance_score': 0.9998...}
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=timeout,
            transport=transport,
            trust_env=False,
        )

    def __enter__(self) -> KaLMRerankClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, payload: Any = None) -> Any:
        """Send one request; return the decoded JSON or raise ``KaLMHTTPError``."""
        response = self._http.request(method, path, json=payload)
        if response.is_success:
            return response.json()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise KaLMHTTPError(response.status_code, message, url=str(response.url))

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")  # type: ignore[no-any-return]

    def rerank(
        self, query: str, documents: Sequence[str], **options: Any
    ) -> dict[str, Any]:
        """``POST /rerank``; options: top_k, instruction, return_margin, ..."""
        payload = {"query": query, "documents": list(documents), **options}
        return self.request("POST", "/rerank", payload)  # type: ignore[no-any-return]

    def score(self, pairs: Sequence[dict[str, Any]], **options: Any) -> dict[str, Any]:
        """``POST /score``; pairs are ``{"query", "document", "id"?}``."""
        payload = {"pairs": list(pairs), **options}
        return self.request("POST", "/score", payload)  # type: ignore[no-any-return]
