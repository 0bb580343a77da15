# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-client``: send one request to ``kalm-vllm-serve``, print the answer."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import httpx

from kalm_t5gemma2_vllm_plugin.client import DEMO_PAYLOADS, KaLMRerankClient
from kalm_t5gemma2_vllm_plugin.constants import ENV_API_KEY
from kalm_t5gemma2_vllm_plugin.errors import KaLMHTTPError

__all__ = ["main"]


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


if __name__ == "__main__":
    sys.exit(main())
