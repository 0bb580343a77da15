# SPDX-License-Identifier: Apache-2.0
"""``KaLMRerankClient`` and ``kalm-vllm-client``: talk to ``kalm-vllm-serve``.

Light tier: httpx only (no torch, no vLLM). Requests go to the given host only:
proxy settings from the environment are ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import httpx

from .constants import ENV_API_KEY, SAMPLE_DOCUMENTS, SAMPLE_QUERY
from .errors import KaLMHTTPError

__all__ = ["DEMO_PAYLOADS", "KaLMRerankClient", "main"]

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kalm-vllm-client``."""
    parser = argparse.ArgumentParser(
        prog="kalm-vllm-client", description="Send a request to kalm-vllm-serve."
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--health", action="store_true", help="GET /health only")
    parser.add_argument("--endpoint", choices=["rerank", "score"], default="rerank")
    parser.add_argument(
        "--json-file",
        help="request body (one JSON object); default: a built-in demo payload",
    )
    parser.add_argument("--return-margin", action="store_true")
    parser.add_argument("--top-k", type=int, help="rerank only; overrides the file")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--api-key",
        default=os.environ.get(ENV_API_KEY),
        help=f"bearer token (default: ${ENV_API_KEY})",
    )
    args = parser.parse_args(argv)
    if args.top_k is not None and (args.endpoint != "rerank" or args.top_k < 0):
        parser.error("--top-k needs --endpoint rerank and a value >= 0")

    try:
        with KaLMRerankClient(
            args.base_url, api_key=args.api_key, timeout=args.timeout
        ) as client:
            if args.health:
                result = client.health()
            else:
                if args.json_file:
                    with open(args.json_file, encoding="utf-8") as f:
                        payload = json.load(f)
                else:
                    payload = json.loads(json.dumps(DEMO_PAYLOADS[args.endpoint]))
                if args.return_margin:
                    payload["return_margin"] = True
                if args.top_k is not None:
                    payload["top_k"] = args.top_k
                result = client.request("POST", f"/{args.endpoint}", payload)
    except KaLMHTTPError as exc:
        print(f"kalm-vllm-client: {exc}", file=sys.stderr)
        return 1
    except (httpx.HTTPError, OSError, ValueError) as exc:
        print(f"kalm-vllm-client: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0
