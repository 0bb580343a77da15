# SPDX-License-Identifier: Apache-2.0
"""Auth, request limits, overload, client disconnects and graceful shutdown."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from tests.server.conftest import RunningServer, kalm_serve

pytestmark = pytest.mark.server

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_DOCUMENTS = 300
# Long documents make a request last long enough to overlap or abandon it.
LONG_DOCS = [synthetic_text(900, seed=i) for i in range(MAX_DOCUMENTS)]


@pytest.fixture(scope="module")
def guarded(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    running = kalm_serve(
        tiny_checkpoint,
        tmp_path_factory.mktemp("guarded"),
        "--api-key",
        KEY,
        "--max-documents",
        str(MAX_DOCUMENTS),
        "--max-pairs",
        "10",
        "--max-body-mb",
        "4",
        "--max-concurrent-requests",
        "1",
    )
    yield running
    running.stop()


@pytest.fixture()
def http(guarded: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=guarded.url, trust_env=False, timeout=300) as client:
        yield client


def _engine_counter(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics", headers=AUTH).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _in_flight(http: httpx.Client) -> int:
    return int(http.get("/health").json()["requests_in_flight"])


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/rerank"),
        ("POST", "/score"),
        ("POST", "/v1/rerank"),
        ("POST", "/v2/rerank"),
        ("GET", "/metrics"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
    ],
)
def test_every_route_but_health_needs_the_key(
    http: httpx.Client, method: str, path: str
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = http.request(method, path, headers=headers, json={})
        assert response.status_code == 401, (path, headers)
        assert response.json()["error"]["type"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    assert http.get("/health").status_code == 200


def test_the_key_opens_the_routes(http: httpx.Client) -> None:
    response = http.post(
        "/rerank", headers=AUTH, json={"query": "q", "documents": ["a"]}
    )
    assert response.status_code == 200
    assert http.get("/metrics", headers=AUTH).status_code == 200


def test_limits_answer_413_with_the_limit(http: httpx.Client) -> None:
    too_many = http.post(
        "/rerank",
        headers=AUTH,
        json={"query": "q", "documents": ["a"] * (MAX_DOCUMENTS + 1)},
    )
    assert too_many.status_code == 413
    assert f"at most {MAX_DOCUMENTS}" in too_many.json()["error"]["message"]
    assert too_many.json()["error"]["field"] == "documents"
    pairs = http.post(
        "/score", headers=AUTH, json={"pairs": [{"query": "q", "document": "d"}] * 11}
    )
    assert pairs.status_code == 413 and "at most 10" in pairs.json()["error"]["message"]
    big = b'{"query": "q", "documents": ["' + b"x" * (5 * 1024 * 1024) + b'"]}'
    declared = http.post(
        "/rerank", headers={**AUTH, "content-type": "application/json"}, content=big
    )
    assert declared.status_code == 413
    assert "exceeds 4194304 bytes" in declared.json()["error"]["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while reading
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    streamed = http.post(
        "/rerank",
        headers={**AUTH, "content-type": "application/json"},
        content=chunked(),
    )
    assert streamed.status_code == 413
    assert (
        http.post(
            "/rerank", headers=AUTH, json={"query": "q", "documents": ["a"]}
        ).status_code
        == 200
    )


def test_requests_beyond_the_concurrency_limit_get_429(
    http: httpx.Client, guarded: RunningServer
) -> None:
    payload = {"query": "q", "documents": LONG_DOCS[:200]}

    def send(i: int) -> httpx.Response:
        with httpx.Client(base_url=guarded.url, trust_env=False, timeout=300) as client:
            return client.post(
                "/rerank", headers=AUTH, json={**payload, "query": f"q{i}"}
            )

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(send, range(4)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes, codes
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.json()["error"]["type"] == "overloaded"
    assert rejected.headers["retry-after"] == "1"
    assert _in_flight(http) == 0


def test_a_client_that_leaves_aborts_its_work(http: httpx.Client) -> None:
    before = _engine_counter(http, "kalm_requests_scored_total")
    with pytest.raises(httpx.ReadTimeout):
        http.post(
            "/rerank",
            headers=AUTH,
            timeout=0.5,
            json={"query": "abandoned", "documents": LONG_DOCS},
        )
    deadline = time.monotonic() + 30
    while _in_flight(http) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _in_flight(http) == 0  # the slot is released (limit is 1)
    time.sleep(1.0)
    scored = _engine_counter(http, "kalm_requests_scored_total") - before
    assert scored < len(LONG_DOCS), "the abandoned pairs were all scored anyway"
    response = http.post(
        "/rerank", headers=AUTH, json={"query": "q", "documents": ["a"]}
    )
    assert response.status_code == 200


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(
    guarded: RunningServer, http: httpx.Client
) -> None:
    """Last test of the module: it stops the shared server."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            http.post,
            "/rerank",
            headers=AUTH,
            json={"query": "last", "documents": LONG_DOCS[:150]},
        )
        deadline = time.monotonic() + 30
        while (
            not _in_flight(http) and not future.done() and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert not future.done(), "request finished before SIGTERM could be sent"
        code = guarded.stop(timeout=180)
        response = future.result()
    assert response.status_code == 200 and len(response.json()["results"]) == 150
    assert code == 0, guarded.log.read_text()[-3000:]
