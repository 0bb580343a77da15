# SPDX-License-Identifier: Apache-2.0
"""KaLMRerankClient against a mock transport (the real server is in tests/server)."""

import json

import httpx
import pytest

from kalm_t5gemma2_vllm_plugin.client import KaLMRerankClient
from kalm_t5gemma2_vllm_plugin.errors import KaLMHTTPError


def _transport(
    status: int, body: object, seen: list[httpx.Request]
) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handler)


def test_rerank_posts_the_payload_with_the_key() -> None:
    seen: list[httpx.Request] = []
    answer = {"object": "rerank", "results": []}
    with KaLMRerankClient(
        "http://server:1/", api_key="k", transport=_transport(200, answer, seen)
    ) as client:
        assert client.rerank("q", ["a", "b"], top_k=1) == answer
    (request,) = seen
    assert str(request.url) == "http://server:1/rerank"
    assert request.headers["authorization"] == "Bearer k"
    assert json.loads(request.content) == {
        "query": "q",
        "documents": ["a", "b"],
        "top_k": 1,
    }


@pytest.mark.parametrize(
    "body,message",
    [
        (
            {"error": {"type": "invalid_request", "message": "documents: too short"}},
            "documents: too short",
        ),
        ("plain text failure", "plain text failure"),
    ],
    ids=["json-error", "text-error"],
)
def test_errors_carry_status_and_server_message(body: object, message: str) -> None:
    with KaLMRerankClient(
        "http://server:1", transport=_transport(422, body, [])
    ) as client:
        with pytest.raises(KaLMHTTPError) as raised:
            client.score([{"query": "q", "document": "d"}])
    assert raised.value.status == 422 and raised.value.message == message
    assert "HTTP 422 from http://server:1/score" in str(raised.value)
