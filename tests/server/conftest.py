# SPDX-License-Identifier: Apache-2.0
"""Real server processes on 127.0.0.1 for the HTTP tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

STARTUP_TIMEOUT = 240.0


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    command: Sequence[str],
    log: Path,
    *,
    health: str = "/health",
    env: dict[str, str] | None = None,
) -> RunningServer:
    """Start ``command`` (which must listen on the port in it) and wait for health."""
    port = command[command.index("--port") + 1]
    url = f"http://127.0.0.1:{port}"
    full_env = {
        **os.environ,
        "VLLM_LOGGING_LEVEL": "WARNING",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        **(env or {}),
    }
    out = open(log, "wb")  # noqa: SIM115 - closed when the process ends
    process = subprocess.Popen(
        list(command), stdout=out, stderr=subprocess.STDOUT, env=full_env
    )
    server = RunningServer(url, process, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with httpx.Client(trust_env=False, timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log.read_text()[-4000:]}")
            try:
                if client.get(url + health).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(1.0)
    server.stop()
    raise RuntimeError(
        f"server not healthy in {STARTUP_TIMEOUT}s:\n{log.read_text()[-4000:]}"
    )


def kalm_serve(checkpoint: Path, tmp: Path, *extra: str) -> RunningServer:
    command = [
        sys.executable,
        "-m",
        "kalm_t5gemma2_vllm_plugin.cli.serve",
        "--model",
        str(checkpoint),
        "--port",
        str(free_port()),
        "--dtype",
        "float32",
        "--log-level",
        "warning",
        "--served-model-name",
        "tiny",
        *extra,
    ]
    return start_server(command, tmp / "server.log")


@pytest.fixture(scope="module")
def server(
    tiny_checkpoint: Path, store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """``kalm-vllm-serve`` on the tiny checkpoint with a passage store attached;
    no auth, default limits."""
    running = kalm_serve(
        tiny_checkpoint, tmp_path_factory.mktemp("serve"), "--passage-store", str(store)
    )
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


@pytest.fixture()
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, trust_env=False, timeout=120) as client:
        yield client
