# SPDX-License-Identifier: Apache-2.0
"""Real client libraries, unchanged, against one real ``kalm-vllm-serve``.

Each family's script (``scripts/<family>_client.py``) runs once in that family's
pinned venv and reports every case's ``(index, score)`` list in the client's own
order; each case must equal the server's own ``/rerank`` answer for the same
query and documents (same order, scores within ``SCORE_ATOL``), cut to the
number of results that client asks for. The server runs with ``--api-key``,
since every client sends one.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.clients.conftest import CLIENT_FAMILIES, venv_python
from tests.clients.venvs import FAMILIES
from tests.server.conftest import RunningServer, kalm_serve

pytestmark = pytest.mark.clients

KEY = "kalm-clients-test-key"
SCRIPTS = Path(__file__).with_name("scripts")
#: Same server, same pairs: only float32 batch jitter (clients.md saw 1.1e-7).
SCORE_ATOL = 1e-5
_SCRIPT_TIMEOUT_S = 300

QUERY = "How do vaccines train the immune system?"
DOCUMENTS = [
    "Vaccines expose the immune system to a harmless piece of a pathogen.",
    "Memory B cells remember an antigen and respond faster the next time.",
    "The Eiffel Tower was completed in 1889 for the World's Fair.",
    "Booster shots refresh immune memory that fades over the years.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "Some vaccines use mRNA to teach cells to make a viral protein.",
    "Herd immunity protects people who cannot be vaccinated themselves.",
    "A sourdough starter is a culture of wild yeast and bacteria.",
]
N = len(DOCUMENTS)

#: (family, case, results the client asks for): each must match the server.
RANK_CASES = [
    ("cohere", "v2", N),
    ("cohere", "v2_top3", 3),
    ("cohere", "v2_default", N),
    ("cohere", "v1_top3", 3),
    ("cohere", "async_v2_0", N),  # four at once
    ("cohere", "async_v2_1", N),
    ("cohere", "async_v2_2", N),
    ("cohere", "async_v2_3", N),
    ("langchain", "cohere", N),
    ("langchain", "cohere_default_top3", 3),
    ("langchain", "compression_retriever_top5", 5),
    ("langchain", "jina", N),
    ("llamaindex", "cohere", N),
    ("llamaindex", "jina", N),
    ("llamaindex", "tei", N),
    ("llamaindex", "tei_top3", 3),
    ("haystack", "cohere", N),
    ("haystack", "cohere_async", N),
    ("haystack", "jina", N),
    ("haystack", "tei", N),
    ("haystack", "tei_right", N),
    ("litellm", "cohere", N),
    ("litellm", "cohere_top3", 3),
    ("litellm", "cohere_v1", N),
    ("litellm", "cohere_async", N),
    ("litellm", "jina_ai", N),
    ("litellm", "hosted_vllm", N),
    ("litellm", "infinity", N),
    ("litellm", "huggingface_tei", N),
    ("litellm", "huggingface_tei_top3", 3),
    ("rerankers", "cohere_v1", N),
    ("rerankers", "cohere_v2", N),
    ("rerankers", "jina", N),
    ("rerankers", "tei", N),
]


@pytest.fixture(scope="module")
def server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    running = kalm_serve(
        tiny_checkpoint, tmp_path_factory.mktemp("clients"), "--api-key", KEY
    )
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def truth(server: RunningServer) -> list[dict[str, Any]]:
    """The server's own ``/rerank`` results for the query and documents."""
    with httpx.Client(trust_env=False, timeout=120) as http:
        response = http.post(
            server.url + "/rerank",
            json={"query": QUERY, "documents": DOCUMENTS, "return_margin": True},
            headers={"Authorization": f"Bearer {KEY}"},
        )
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def _client_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV") and "proxy" not in k.lower()
    }
    # Loopback only, and no library phones home (Haystack and LangChain would).
    env.update(
        NO_PROXY="127.0.0.1,localhost",
        HAYSTACK_TELEMETRY_ENABLED="False",
        LANGCHAIN_TRACING_V2="false",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture(scope="module")
def report(
    server: RunningServer,
    client_pythons: dict[str, Path | str],
    tier_timing: Callable[[str], None],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], dict[str, Any]]:
    """``report(family)``: that family's script output, run once per module."""
    done: dict[str, dict[str, Any]] = {}
    reports = tmp_path_factory.mktemp("client-reports")
    spec = {
        "url": server.url,
        "key": KEY,
        "model": "tiny",
        "query": QUERY,
        "documents": DOCUMENTS,
    }

    def run(family: str) -> dict[str, Any]:
        if family not in done:
            python = venv_python(client_pythons, family)
            script = SCRIPTS / f"{family}_client.py"
            out = reports / f"{family}.json"
            result = subprocess.run(
                [str(python), str(script), str(out)],
                input=json.dumps(spec),
                capture_output=True,
                text=True,
                env=_client_env(),
                timeout=_SCRIPT_TIMEOUT_S,
                check=False,
            )
            assert result.returncode == 0, result.stderr[-4000:]
            done[family] = json.loads(out.read_text(encoding="utf-8"))
            versions = ", ".join(
                f"{p} {v}" for p, v in done[family]["versions"].items()
            )
            tier_timing(f"{family}: ran against the server with {versions}")
        return done[family]

    return run


def _case(report: Callable[[str], dict[str, Any]], family: str, case: str) -> Any:
    outcome = report(family)["cases"][case]
    assert "ranks" in outcome, f"{family}/{case} raised: {outcome['error']}"
    return outcome["ranks"]


@pytest.mark.parametrize("family", CLIENT_FAMILIES)
def test_each_client_runs_its_pinned_versions(
    report: Callable[[str], dict[str, Any]], family: str
) -> None:
    versions = report(family)["versions"]
    for pin in FAMILIES[family].pins:
        package, version = pin.split("==")
        assert versions[package.split("[")[0]] == version


@pytest.mark.parametrize(
    ("family", "case", "top"),
    RANK_CASES,
    ids=[f"{f}-{c}" for f, c, _ in RANK_CASES],
)
def test_client_ranks_exactly_as_the_server_does(
    report: Callable[[str], dict[str, Any]],
    truth: list[dict[str, Any]],
    family: str,
    case: str,
    top: int,
) -> None:
    ranks = _case(report, family, case)
    expected = truth[:top]
    assert [i for i, _ in ranks] == [r["index"] for r in expected]
    for (_, score), want in zip(ranks, expected, strict=True):
        assert score == pytest.approx(want["score"], abs=SCORE_ATOL)


def test_haystack_tei_raw_scores_are_the_margins(
    report: Callable[[str], dict[str, Any]], truth: list[dict[str, Any]]
) -> None:
    ranks = _case(report, "haystack", "tei_raw_scores")
    assert [i for i, _ in ranks] == [r["index"] for r in truth]
    for (_, margin), want in zip(ranks, truth, strict=True):
        assert margin == pytest.approx(want["margin"], abs=SCORE_ATOL)


@pytest.mark.parametrize(
    ("family", "case", "error_type", "status", "fragments"),
    [
        ("cohere", "wrong_key", "UnauthorizedError", 401, ("Authorization",)),
        ("litellm", "wrong_key", "AuthenticationError", 401, ("Authorization",)),
        # TEI's error shape reaches the user through Haystack's own message.
        (
            "haystack",
            "tei_left",
            "RuntimeError",
            None,
            ("only right truncation is supported", '"error_type":"Validation"'),
        ),
    ],
    ids=["cohere-wrong-key", "litellm-wrong-key", "haystack-tei-left"],
)
def test_client_errors_carry_the_server_message(
    report: Callable[[str], dict[str, Any]],
    family: str,
    case: str,
    error_type: str,
    status: int | None,
    fragments: tuple[str, ...],
) -> None:
    outcome = report(family)["cases"][case]
    assert "error" in outcome, f"{family}/{case} did not fail: {outcome}"
    error = outcome["error"]
    assert error["type"] == error_type
    assert error["status"] == status
    assert all(f in error["message"] for f in fragments), error["message"]
