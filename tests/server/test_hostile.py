# SPDX-License-Identifier: Apache-2.0
"""Hostile input and what real clients expect (issue 12: F8-F13, client items).

Three servers: the shared ``server`` (no key), ``keyed`` (a key, CORS, a
small ``max_model_len`` and short connection timeouts), and, for F8 only, an
in-process uvicorn with no engine whose scoring fails on purpose: after every
known fault was fixed, no real code path gives a 500 to test with.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import STARTUP_TIMEOUT, RunningServer, free_port

pytestmark = pytest.mark.server

KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "http://app.example"
READ_TIMEOUT = 3.0  # the keyed server's --request-read-timeout
HEX_ID = re.compile(r"[0-9a-f]{32}")


# --- raw HTTP on one socket ---------------------------------------------------------
@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _read(sock: socket.socket, count: int, timeout: float) -> tuple[list[Raw], bool]:
    """Up to ``count`` responses from ``sock``, and whether it was closed."""
    sock.settimeout(timeout)
    buffer, answers = b"", []
    while len(answers) < count:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end >= 0:
            lines = buffer[:head_end].decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip()
                for k, v in (line.split(":", 1) for line in lines[1:])
            }
            end = head_end + 4 + int(headers.get("content-length", "0"))
            if len(buffer) >= end:
                status = int(lines[0].split()[1])
                answers.append(Raw(status, headers, buffer[head_end + 4 : end]))
                buffer = buffer[end:]
                continue
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return answers, True
        if not chunk:
            return answers, True
        buffer += chunk
    return answers, False


def _request(
    method: str, path: str, body: bytes = b"", length: int | None = None, **headers: str
) -> bytes:
    """One HTTP/1.1 request; ``length`` declares another Content-Length."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if body or method == "POST" or length is not None:
        lines.append(f"Content-Length: {len(body) if length is None else length}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _raw(url: str, data: bytes, count: int = 1, timeout: float = 60.0) -> list[Raw]:
    with socket.create_connection(_address(url)) as sock:
        sock.sendall(data)
        return _read(sock, count, timeout)[0]


def _assert_error_body(response: httpx.Response | Raw, status: int, type_: str) -> dict:
    """The documented error body: JSON, type and message, detail = message."""
    code = (
        response.status_code
        if isinstance(response, httpx.Response)
        else response.status
    )
    assert code == status, (code, response.headers, response.json())
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    error = body["error"]
    assert error["type"] == type_ and error["message"], body
    assert body["detail"] == error["message"]
    assert set(error) <= {"type", "message", "field"}
    return error  # type: ignore[no-any-return]


# --- servers ------------------------------------------------------------------------
@dataclass
class KeyedServer(RunningServer):
    """Also what /health and a POST answered while the engine was starting."""

    starting: list[tuple[str, int, dict[str, str], Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
def keyed(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KeyedServer]:
    port = free_port()
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    command = [
        sys.executable,
        "-m",
        "kalm_t5gemma2_vllm_plugin.cli.serve",
        "--model",
        str(tiny_checkpoint),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--log-level",
        "warning",
        "--served-model-name",
        "tiny",
        "--api-key",
        KEY,
        "--allowed-origins",
        ORIGIN,
        "--max-model-len",
        "1024",  # start-up accepts it: a full-length query and document need 827
        "--request-read-timeout",
        str(READ_TIMEOUT),
        "--timeout-keep-alive",
        "2",
    ]
    out = open(log, "wb")  # noqa: SIM115 - closed when the process ends
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = KeyedServer(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with httpx.Client(base_url=server.url, trust_env=False, timeout=5) as client:
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-4000:]
            try:
                health = client.get("/health")
                if health.status_code == 200:
                    break
                if len(server.starting) < 2:
                    post = client.post(
                        "/rerank", headers=AUTH, json={"query": "q", "documents": ["a"]}
                    )
                    for name, answer in (("health", health), ("rerank", post)):
                        server.starting.append(
                            (
                                name,
                                answer.status_code,
                                dict(answer.headers),
                                answer.json(),
                            )
                        )
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            server.stop()
            raise RuntimeError(f"not healthy in time:\n{log.read_text()[-4000:]}")
    yield server
    assert server.stop() == 0, log.read_text()[-3000:]


@pytest.fixture()
def key_http(keyed: KeyedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=keyed.url, trust_env=False, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def failing() -> Iterator[str]:
    """uvicorn with the real app, middleware and protocol, no engine, and a
    service whose scoring raises an unexpected error."""
    import uvicorn

    from kalm_t5gemma2_vllm_plugin.engine.session import EngineOptions
    from kalm_t5gemma2_vllm_plugin.server import create_app
    from kalm_t5gemma2_vllm_plugin.server.protocol import uvicorn_options
    from kalm_t5gemma2_vllm_plugin.server.service import RerankService, ServiceConfig

    class FailingService(RerankService):
        ready = True  # type: ignore[assignment]

        async def score(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("injected fault")

    config = ServiceConfig(EngineOptions(model="failing", model_path="/nonexistent"))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, FailingService(config)),
            host="127.0.0.1",
            port=port,
            lifespan="off",
            log_level="critical",
            **uvicorn_options(),
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


# --- F8 ------------------------------------------------------------------------------
RERANK = json.dumps({"query": "q", "documents": ["a"]}).encode()


def test_a_500_keeps_the_connection_and_answers_the_pipelined_request(
    failing: str,
) -> None:
    """F8: after a 500 uvicorn closed the connection; a request pipelined
    behind it got no answer, a keep-alive client a transport error."""
    pipelined = _request("POST", "/rerank", RERANK) + _request("GET", "/health")
    with socket.create_connection(_address(failing)) as sock:
        sock.sendall(pipelined)
        answers, closed = _read(sock, 2, timeout=10)
        assert [a.status for a in answers] == [500, 200] and not closed
        _assert_error_body(answers[0], 500, "internal_error")
        assert answers[0].json()["error"]["message"] == "Internal server error."
        for _ in range(3):  # and the same connection keeps serving
            sock.sendall(
                _request("POST", "/score", b'{"pairs":[{"query":"q","document":"a"}]}')
            )
            (again,), closed = _read(sock, 1, timeout=10)
            assert again.status == 500 and not closed
    with httpx.Client(base_url=failing, trust_env=False, timeout=10) as client:
        codes = [
            client.post("/rerank", content=RERANK).status_code
            if i % 2
            else client.get("/health").status_code
            for i in range(20)
        ]
    assert codes == [200, 500] * 10


def test_client_errors_keep_the_connection_too(server: RunningServer) -> None:
    requests = [
        _request("GET", "/v3/rerank"),
        _request("POST", "/rerank", b"{"),
        _request("POST", "/score", b'{"pairs":[]}'),
        _request("POST", "/rerank", b'{"query":"q","documents":["a"],"model":"gpt"}'),
        _request("POST", "/rerank", RERANK),
    ]
    answers = _raw(server.url, b"".join(requests), count=len(requests))
    assert [a.status for a in answers] == [404, 400, 422, 404, 200]


# --- F9 ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "query,kept",
    [("北" * 200, "北" * 170), ("a" + "😀" * 300, "a" + "😀" * 127)],
    ids=["cjk", "emoji"],
)
def test_a_query_cut_inside_a_character_fits_a_small_max_model_len(
    key_http: httpx.Client, query: str, kept: str
) -> None:
    """F9: the cut query re-encoded to 1536 tokens and overflowed
    max_model_len=1024 (a 500); now it holds query_max_length exactly."""
    response = key_http.post(
        "/rerank", headers=AUTH, json={"query": query, "documents": ["a", "b"]}
    )
    assert response.status_code == 200, response.text
    same = key_http.post(
        "/rerank", headers=AUTH, json={"query": kept, "documents": ["a", "b"]}
    ).json()
    got = response.json()["results"]
    assert [r["index"] for r in got] == [r["index"] for r in same["results"]]
    for ours, theirs in zip(got, same["results"], strict=True):
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-6)


# --- F10 -----------------------------------------------------------------------------
def test_headers_sent_a_byte_a_second_are_cut_off_while_others_are_served(
    keyed: KeyedServer,
) -> None:
    request = _request("GET", "/health", X_Padding="x" * 40)
    started = time.monotonic()
    with (
        socket.create_connection(_address(keyed.url)) as sock,
        httpx.Client(base_url=keyed.url, trust_env=False, timeout=5) as other,
    ):
        sock.settimeout(1.0)  # so one byte goes out per second
        for i, byte in enumerate(request):
            assert time.monotonic() - started < READ_TIMEOUT + 3, "never cut off"
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1, socket.MSG_PEEK):
                    break  # the server has answered
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                break
            if i == 1:  # meanwhile another client is served at once
                waited = time.monotonic()
                assert other.get("/health").status_code == 200
                assert time.monotonic() - waited < 1.0
        cut_after = time.monotonic() - started
        answers, _ = _read(sock, 1, timeout=2)
        _, closed = _read(sock, 1, timeout=2)
    print(f"\nslow headers cut after {cut_after:.2f} s (timeout {READ_TIMEOUT:g} s)")
    assert closed and READ_TIMEOUT - 0.5 <= cut_after <= READ_TIMEOUT + 2
    (answer,) = answers
    _assert_error_body(answer, 408, "request_timeout")
    assert answer.headers["connection"] == "close"


def test_a_stalled_body_and_a_silent_connection_are_cut_off(keyed: KeyedServer) -> None:
    stalled = _request(
        "POST", "/rerank", b'{"query":', length=1000, Authorization=f"Bearer {KEY}"
    )
    for data in (stalled, b""):  # a body that stops; a connection that sends nothing
        started = time.monotonic()
        with socket.create_connection(_address(keyed.url)) as sock:
            sock.sendall(data)
            answers, closed = _read(sock, 1, timeout=READ_TIMEOUT + 5)
            if answers:
                _, closed = _read(sock, 1, timeout=5)
        assert closed and time.monotonic() - started <= READ_TIMEOUT + 2
        (answer,) = answers
        _assert_error_body(answer, 408, "request_timeout")
    assert httpx.get(keyed.url + "/health", trust_env=False).status_code == 200


def test_oversized_headers_get_431_and_bad_http_a_json_400(
    server: RunningServer,
) -> None:
    """F10: a 64 MiB header was buffered and answered 200; F12: uvicorn's own
    400s were text/plain."""
    fine = _raw(server.url, _request("GET", "/health", X_Big="x" * 8192))
    assert fine[0].status == 200
    (big,) = _raw(server.url, _request("GET", "/health", X_Big="x" * (128 * 1024)))
    error = _assert_error_body(big, 431, "headers_too_large")
    assert "65536 bytes" in error["message"]
    for garbage in (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # TLS hello
        _request("GET", "/health", Content_Length="-1"),
        b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    ):
        (answer,) = _raw(server.url, garbage)
        _assert_error_body(answer, 400, "invalid_http")
        assert HEX_ID.fullmatch(answer.headers["x-request-id"])


# --- F11, F12 -------------------------------------------------------------------------
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "method,path,body,headers,status,type_,field",
    [
        ("GET", "/v3/rerank", None, {}, 404, "not_found", None),
        ("DELETE", "/v1/rerank", None, {}, 405, "method_not_allowed", None),
        ("POST", "/rerank", b"{", {}, 400, "invalid_json", None),
        ("POST", "/rerank", b"", {}, 400, "invalid_json", None),
        ("POST", "/v2/rerank", b"[null, null]", {}, 400, "invalid_request", None),
        (
            "POST",
            "/rerank",
            b'{"query":"\xff","documents":["a"]}',
            {},
            400,
            "invalid_json",
            None,
        ),
        (
            "POST",
            "/rerank",
            b'{"query":"q","documents":["a"],"top_k":' + b"7" * 5000 + b"}",
            {},
            400,
            "invalid_json",
            None,
        ),
        (
            "POST",
            "/rerank",
            b'{"query":"q","documents":' + _nested(100_000).encode() + b"}",
            {},
            400,
            "invalid_json",
            None,
        ),
        (
            "POST",
            "/rerank",
            RERANK,
            {"content-encoding": "gzip"},
            415,
            "unsupported_media_type",
            None,
        ),
        (
            "POST",
            "/v2/rerank",
            b'{"query":"q","documents":["a"],"return_documents":"maybe"}',
            {},
            422,
            "invalid_request",
            "return_documents",
        ),
        (
            "POST",
            "/score",
            b'{"pairs":[{"query":"q","document":"a","id":NaN}]}',
            {},
            422,
            "invalid_request",
            "pairs.0.id",
        ),
        (
            "POST",
            "/score",
            b'{"pairs":[{"query":"q","document":"a","id":{"x":[Infinity]}}]}',
            {},
            422,
            "invalid_request",
            "pairs.0.id",
        ),
        (
            "POST",
            "/score",
            b'{"pairs":[{"query":"q","document":"a","id":'
            + _nested(256).encode()
            + b"}]}",
            {},
            422,
            "invalid_request",
            "pairs.0.id",
        ),
        (
            "POST",
            "/score",
            b'{"pairs":[{"query":"q","document":"a"},{"query":"q","document_id":"nope"}]}',
            {},
            404,
            "document_not_found",
            "pairs.1.document_id",
        ),
    ],
    ids=[
        "unknown-route",
        "wrong-method",
        "malformed-json",
        "empty-body",
        "not-an-object",
        "invalid-utf8",
        "5000-digit-number",
        "nested-1e5",
        "gzip-body",
        "bad-boolean",
        "nan-id",
        "infinity-inside-id",
        "id-nested-256",
        "unknown-stored-id",
    ],
)
def test_every_4xx_is_the_documented_json_naming_the_field(
    http: httpx.Client,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    status: int,
    type_: str,
    field: str | None,
) -> None:
    """F11 (deep and NaN ids were a 500 and a silent null) and F12."""
    response = http.request(
        method,
        path,
        content=body,
        headers={"content-type": "application/json", **headers},
    )
    error = _assert_error_body(response, status, type_)
    assert error.get("field") == field
    assert HEX_ID.fullmatch(response.headers["x-request-id"])
    if status == 405:
        assert response.headers["allow"] == "POST"


def test_a_body_over_the_limit_is_a_json_413_before_it_is_sent(
    server: RunningServer,
) -> None:
    head = _request("POST", "/rerank", length=40 * 1024 * 1024)
    (answer,) = _raw(server.url, head)
    error = _assert_error_body(answer, 413, "payload_too_large")
    assert "exceeds 33554432 bytes" in error["message"]


def test_ids_that_can_be_written_back_are_echoed_unchanged(http: httpx.Client) -> None:
    ids = [json.loads(_nested(64)), 2**80, {"a": [1.5, None, "x"]}]
    response = http.post(
        "/score",
        json={"pairs": [{"query": "q", "document": "a", "id": i} for i in ids]},
    )
    assert response.status_code == 200, response.text
    assert [r["id"] for r in response.json()["results"]] == ids


# --- client items ---------------------------------------------------------------------
def test_string_booleans_are_read_as_booleans(http: httpx.Client) -> None:
    """RAGFlow's Xinference factory sends "return_documents": "true"."""
    body = {"query": "q", "documents": ["alpha", "beta"]}
    echoed = http.post("/v1/rerank", json={**body, "return_documents": "true"}).json()
    assert {r["document"]["text"] for r in echoed["results"]} == {"alpha", "beta"}
    bare = http.post("/v1/rerank", json={**body, "return_documents": "False"}).json()
    assert all("document" not in r for r in bare["results"])
    margins = http.post("/rerank", json={**body, "return_margin": "true"}).json()
    assert all("margin" in r for r in margins["results"])


def test_the_request_id_is_echoed_or_made_on_every_response(http: httpx.Client) -> None:
    for method, path, body in (
        ("POST", "/rerank", {"query": "q", "documents": ["a"]}),
        ("POST", "/rerank", {"query": 5}),
        ("GET", "/nowhere", None),
    ):
        sent = http.request(
            method, path, json=body, headers={"x-request-id": "trace-42"}
        )
        assert sent.headers["x-request-id"] == "trace-42"
        made = [
            http.request(method, path, json=body).headers["x-request-id"] for _ in "ab"
        ]
        assert all(HEX_ID.fullmatch(m) for m in made) and made[0] != made[1]
    odd = http.get("/health", headers={"x-request-id": "has space"})
    assert HEX_ID.fullmatch(odd.headers["x-request-id"])  # replaced, not echoed


def test_v1_models_lists_the_served_names_in_openais_shape(http: httpx.Client) -> None:
    listed = http.get("/v1/models").json()
    assert listed["object"] == "list"
    assert [(m["id"], m["object"]) for m in listed["data"]] == [("tiny", "model")]
    assert isinstance(listed["data"][0]["created"], int)
    name = listed["data"][0]["id"]
    body = {"query": "q", "documents": ["a"]}
    assert http.post("/v1/rerank", json={**body, "model": name}).status_code == 200
    assert http.post("/v1/rerank", json={**body, "model": "gpt-4"}).status_code == 404


def test_openapi_declares_the_error_bodies_and_no_scheme_without_a_key(
    http: httpx.Client,
) -> None:
    spec = http.get("/openapi.json").json()
    assert "securitySchemes" not in spec["components"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/rerank", "/v1/rerank", "/v2/rerank", "/score"):
        responses = spec["paths"][path]["post"]["responses"]
        for status in ("400", "404", "413", "415", "422", "429", "500", "503"):
            schema = responses[status]["content"]["application/json"]["schema"]
            # /rerank also answers TEI-shaped requests in TEI's error shape
            assert error_ref in schema.get("anyOf", [schema]), (path, status)
        assert "401" not in responses
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    schema = spec["components"]["schemas"]["ErrorResponse"]
    assert set(schema["required"]) == {"error", "detail"}


def test_openapi_declares_the_bearer_scheme_when_a_key_is_required(
    key_http: httpx.Client,
) -> None:
    spec = key_http.get("/openapi.json", headers=AUTH).json()
    assert spec["components"]["securitySchemes"] == {
        "bearerAuth": {"type": "http", "scheme": "bearer"}
    }
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            if path == "/health":
                assert (
                    "security" not in operation and "401" not in operation["responses"]
                )
            else:
                assert operation["security"] == [{"bearerAuth": []}], path
                assert "401" in operation["responses"], path


@pytest.mark.parametrize(
    "value,status",
    [
        (f"Bearer {KEY}", 200),
        (f"bearer {KEY}", 200),
        (f"BEARER   {KEY}", 200),
        (f"Token {KEY}", 401),
        (KEY, 401),
        ("Bearer", 401),
        (f"Bearer {KEY} extra", 401),
        (f"Bearer {KEY}x", 401),
    ],
    ids=[
        "canonical",
        "lower",
        "upper-spaces",
        "other-scheme",
        "no-scheme",
        "no-key",
        "extra",
        "longer",
    ],
)
def test_the_bearer_scheme_is_case_insensitive(
    key_http: httpx.Client, value: str, status: int
) -> None:
    """RFC 7235: the scheme is case-insensitive; the key is not."""
    response = key_http.get("/v1/models", headers={"Authorization": value})
    assert response.status_code == status
    if status == 401:
        _assert_error_body(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
        assert HEX_ID.fullmatch(response.headers["x-request-id"])


def test_cors_admits_the_allowed_origin_only_when_configured(
    key_http: httpx.Client, http: httpx.Client
) -> None:
    preflight = {
        "origin": ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    }
    ok = key_http.options("/v2/rerank", headers=preflight)  # no key: browsers send none
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    refused = key_http.options(
        "/v2/rerank", headers={**preflight, "origin": "http://evil.example"}
    )
    error = _assert_error_body(refused, 400, "cors_rejected")
    assert "origin" in error["message"].lower()
    answer = key_http.post(
        "/v2/rerank",
        headers={**AUTH, "origin": ORIGIN},
        json={"query": "q", "documents": ["a"]},
    )
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()
    # off by default: nothing is allowed, and OPTIONS is an ordinary 405
    off = http.options("/v2/rerank", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    _assert_error_body(off, 405, "method_not_allowed")


def test_a_503_while_starting_says_when_to_retry(keyed: KeyedServer) -> None:
    """Seen by the fixture while the engine loaded."""
    assert keyed.starting, "the engine was ready before any request saw it start"
    for name, status, headers, body in keyed.starting:
        assert (status, headers["retry-after"]) == (503, "5"), (name, body)
        if name == "health":
            assert body["status"] == "starting"
        else:
            assert body["error"]["type"] == "unavailable" and body["detail"]


def test_concurrent_hostile_requests_leave_the_server_healthy(
    server: RunningServer,
) -> None:
    bad_id = b'{"pairs":[{"query":"q","document":"a","id":NaN}]}'
    sends = [("/rerank", b"{"), ("/score", bad_id), ("/rerank", RERANK)] * 4

    def send(item: tuple[str, bytes]) -> int:
        with httpx.Client(base_url=server.url, trust_env=False, timeout=60) as c:
            return c.post(item[0], content=item[1]).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(send, sends))
    assert codes == [400, 422, 200] * 4
    assert httpx.get(server.url + "/health", trust_env=False).json()["status"] == "ok"
