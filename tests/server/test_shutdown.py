# SPDX-License-Identifier: Apache-2.0
"""Stopping ``kalm-vllm-serve`` (findings F5, F6): SIGTERM drains for at most
``--shutdown-timeout`` seconds and cuts the rest with a JSON 503 and exit code
3; a SIGKILL takes the engine processes with it.

A SIGTERM whose in-flight work finishes in time (200, exit 0) is
``test_guards.py::test_sigterm_lets_in_flight_requests_finish_then_exits_0``.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from tests.server.conftest import RunningServer, kalm_serve

pytestmark = pytest.mark.server

SHUTDOWN_TIMEOUT = 3
# Minutes of engine work on this CPU: far more than the shutdown timeout.
LONG_DOCS = [synthetic_text(200, seed=i) for i in range(3000)]


def _counter(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid``, with its command line (from /proc)."""
    found: dict[int, str] = {}
    stack = [pid]
    while stack:
        parent = stack.pop()
        for task in os.listdir(f"/proc/{parent}/task"):
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text()
            except OSError:
                continue
            for child in map(int, children.split()):
                try:
                    cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                except OSError:
                    continue
                found[child] = cmdline.replace(b"\0", b" ").decode(errors="replace")
                stack.append(child)
    return found


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_cuts_what_outlasts_the_shutdown_timeout_with_503_and_exit_3(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    server = kalm_serve(
        tiny_checkpoint, tmp_path, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)
    )
    try:
        with (
            httpx.Client(base_url=server.url, trust_env=False, timeout=300) as http,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            before = _counter(http, "kalm_passages_encoded_total")
            future = pool.submit(
                http.post, "/rerank", json={"query": "q", "documents": LONG_DOCS}
            )
            deadline = time.monotonic() + 120
            while _counter(http, "kalm_passages_encoded_total") == before:
                assert not future.done() and time.monotonic() < deadline
                time.sleep(0.2)  # until the engine works on it
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            with httpx.Client(base_url=server.url, trust_env=False, timeout=30) as new:
                refused = new.post("/rerank", json={"query": "q", "documents": ["a"]})
                health = new.get("/health")
            response = future.result()
            answered = time.monotonic() - signalled
        code = server.process.wait(timeout=120)
        exited = time.monotonic() - signalled
    finally:
        server.stop()
    log = server.log.read_text()
    # While draining: the port stays open, nothing new is admitted.
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["type"] == "unavailable"
    assert refused.headers["retry-after"] == "5"
    assert health.status_code == 503 and health.json()["status"] == "draining"
    # What outlasts the timeout: the package's JSON error, not a text/plain 500.
    assert response.status_code == 503, response.text[:300]
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "5"
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"]["type"] == "unavailable"
    assert (
        f"within the {SHUTDOWN_TIMEOUT} s shutdown timeout"
        in (body["error"]["message"])
    )
    assert SHUTDOWN_TIMEOUT <= answered < SHUTDOWN_TIMEOUT + 15
    assert code == 3, log[-3000:]
    assert "AssertionError" not in log and "Traceback" not in log, log[-3000:]
    print(f"\nSIGTERM: 503 after {answered:.1f} s, exit 3 after {exited:.1f} s")


def test_sigkill_takes_the_engine_processes_with_it(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    server: RunningServer = kalm_serve(tiny_checkpoint, tmp_path)
    left: dict[int, str] = {}
    try:
        below = _descendants(server.process.pid)
        assert any("EngineCore" in cmd for cmd in below.values()), below
        server.process.kill()
        server.process.wait(timeout=30)
        killed = time.monotonic()
        while time.monotonic() < killed + 15:
            left = {pid: cmd for pid, cmd in below.items() if _alive(pid)}
            if not left:
                break
            time.sleep(0.2)
        gone_after = time.monotonic() - killed
    finally:
        for pid in left:  # do not leak them into other tests
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not left, left
    print(f"\nSIGKILL: {len(below)} engine process(es) gone after {gone_after:.1f} s")
