# SPDX-License-Identifier: Apache-2.0
"""Schemathesis over the live server's own ``/openapi.json``: every operation,
50 examples each, with the API key; no 5xx, and every response conforms to
the published document (status codes, content types, bodies).

Schemathesis runs from its own venv (``tests/clients/venvs.py``), so its pins
never touch the engine's venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.clients.venvs import VenvUnavailable, ensure_venv, how_long
from tests.server.conftest import RunningServer, kalm_serve

pytestmark = pytest.mark.fuzz

KEY = "kalm-fuzz-test-key"
MAX_EXAMPLES = 50
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
#: The tier's budget is 3 minutes; the run itself must stay well inside it.
_RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def schemathesis(tier_timing: Callable[[str], None]) -> Path:
    try:
        python, seconds = ensure_venv("schemathesis")
    except VenvUnavailable as exc:
        message = f"the schemathesis venv could not be installed: {exc}"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(message)
        pytest.skip(message)
    tier_timing(f"schemathesis venv: {how_long(seconds)}")
    return python.parent / "st"


@pytest.fixture(scope="module")
def server(
    tiny_checkpoint: Path, store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    # With a passage store, so that document_ids reach the store's answers too.
    running = kalm_serve(
        tiny_checkpoint,
        tmp_path_factory.mktemp("fuzz"),
        "--api-key",
        KEY,
        "--passage-store",
        str(store),
    )
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


def test_no_operation_answers_5xx_or_off_its_published_schema(
    schemathesis: Path,
    server: RunningServer,
    tmp_path: Path,
    tier_timing: Callable[[str], None],
) -> None:
    command = [
        str(schemathesis),
        "run",
        f"{server.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {KEY}",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--checks",
        ",".join(CHECKS),
        "--seed",
        "1",
        "--workers",
        "1",
        "--request-timeout",
        "120",
        "--generation-database",
        "none",
        "--report",
        "ndjson",
        "--report-dir",
        str(tmp_path),
        "--no-color",
    ]
    started = time.monotonic()
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=_RUN_TIMEOUT_S,
        check=False,
        env={**os.environ, "NO_PROXY": "127.0.0.1,localhost"},
    )
    seconds = time.monotonic() - started
    events = [
        json.loads(line)
        for path in tmp_path.glob("**/*.ndjson")
        for line in path.read_text(encoding="utf-8").splitlines()
    ]
    statuses: dict[int, int] = {}
    for code in _response_codes(events):
        statuses[code] = statuses.get(code, 0) + 1
    tier_timing(
        f"schemathesis: {sum(statuses.values())} requests in {seconds:.1f} s, "
        f"by status {dict(sorted(statuses.items()))}"
    )
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]
    assert statuses and not any(code >= 500 for code in statuses)
    # Every operation of the published document was fuzzed.
    published = {
        f"{method.upper()} {path}"
        for path, operations in _document(server).items()
        for method in operations
    }
    fuzzed = {
        e["ScenarioFinished"]["recorder"]["label"]
        for e in events
        if "ScenarioFinished" in e
    }
    assert fuzzed == published


def _document(server: RunningServer) -> dict[str, dict[str, object]]:
    with httpx.Client(trust_env=False, timeout=30) as http:
        response = http.get(
            server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}
        )
    response.raise_for_status()
    paths: dict[str, dict[str, object]] = response.json()["paths"]
    return paths


def _response_codes(event: object) -> Iterator[int]:
    # The log nests each response (``{"status_code": ...}``) inside its
    # event; look for them wherever they are rather than pin the layout.
    if isinstance(event, dict):
        code = event.get("status_code")
        if isinstance(code, int) and "elapsed" in event:
            yield code
        for value in event.values():
            yield from _response_codes(value)
    elif isinstance(event, list):
        for value in event:
            yield from _response_codes(value)
