# SPDX-License-Identifier: Apache-2.0
"""vLLM's own OpenAI-compatible server with the plugin: no code on the user's side."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import httpx
import pytest

from kalm_t5gemma2_vllm_plugin import KaLMVLLMReranker
from kalm_t5gemma2_vllm_plugin.vllm_model.config import EngineSettings
from tests.helpers import QUERY
from tests.server.conftest import RunningServer, free_port, start_server

pytestmark = pytest.mark.server

DOCS = [
    "The capital of China is Beijing.",
    "Gravity attracts bodies toward one another.",
    "北京是中国的首都",
]
INSTRUCTION = "Given a web search query, retrieve passages that answer the query."


def vllm_server_command(checkpoint: Path, port: int) -> list[str]:
    """The command documented in the README."""
    template = (
        resources.files("kalm_t5gemma2_vllm_plugin")
        / "data"
        / "kalm_score_template.jinja"
    )
    overrides = {
        k: v for k, v in EngineSettings().hf_overrides().items() if v is not None
    }
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(checkpoint),
        "--served-model-name",
        "tiny",
        "--runner",
        "pooling",
        "--enforce-eager",
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--kv-cache-memory-bytes",
        str(64 << 20),
        "--chat-template",
        str(template),
        "--hf-overrides",
        json.dumps(overrides),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@pytest.fixture(scope="module")
def vllm_server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    running = start_server(
        vllm_server_command(tiny_checkpoint, free_port()),
        log,
        env={"VLLM_PLUGINS": "kalm_t5gemma2"},
    )
    yield running
    running.stop()


@pytest.fixture()
def http(vllm_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vllm_server.url, trust_env=False, timeout=120) as client:
        yield client


def test_rerank_routes_match_the_offline_reranker(
    http: httpx.Client, engine: KaLMVLLMReranker
) -> None:
    expected = engine.predict([(QUERY, d) for d in DOCS])
    for route in ("/rerank", "/v1/rerank", "/v2/rerank"):
        response = http.post(
            route, json={"model": "tiny", "query": QUERY, "documents": DOCS}
        )
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["index"] for r in results] == sorted(
            range(3), key=lambda i: -expected[i]
        )
        for result in results:
            assert result["relevance_score"] == pytest.approx(
                expected[result["index"]], abs=1e-6
            )


def test_score_route_matches_in_input_order(
    http: httpx.Client, engine: KaLMVLLMReranker
) -> None:
    response = http.post(
        "/score", json={"model": "tiny", "queries": QUERY, "documents": DOCS}
    )
    assert response.status_code == 200, response.text
    got = [item["score"] for item in response.json()["data"]]
    assert got == pytest.approx(engine.predict([(QUERY, d) for d in DOCS]), abs=1e-6)


def test_margins_and_per_request_instruction(
    http: httpx.Client, engine: KaLMVLLMReranker
) -> None:
    response = http.post(
        "/rerank",
        json={
            "model": "tiny",
            "query": QUERY,
            "documents": DOCS,
            "use_activation": False,
            "instruction": INSTRUCTION,
        },
    )
    assert response.status_code == 200, response.text
    expected = engine.margins([(QUERY, d) for d in DOCS], instruction=INSTRUCTION)
    for result in response.json()["results"]:
        assert result["relevance_score"] == pytest.approx(
            expected[result["index"]], abs=1e-4
        )
