# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: locally built checkpoints, the reference, one shared engine.

Environment for the whole run is set here, before anything imports vLLM:
in-process engine core (seconds to start instead of tens), no Hub access,
no usage statistics, vLLM logs on stderr.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ.setdefault("VLLM_PLUGINS", "kalm_t5gemma2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import (  # noqa: E402
    S3_BUCKET,
    corpus_docs,
    free_port,
    run_encode,
    write_corpus,
)

# --- opt-in tiers -----------------------------------------------------------------
#: Marker -> the environment variable that also turns the tier on. A plain
#: ``pytest`` collects these tests and skips them; ``-m <tier>`` (any -m
#: expression naming the marker that still selects them) or ``VAR=1`` runs them.
OPT_IN_TIERS = {
    "compat": "KALM_COMPAT",  # downloads two vLLM wheels on a cold cache
    "clients": "KALM_CLIENTS",  # installs six client venvs on a cold cache
    "fuzz": "KALM_FUZZ",  # installs schemathesis in its own venv
    "bench": "KALM_BENCH",  # kalm-vllm-bench end to end (minutes)
    "eval": "KALM_EVAL",  # kalm-vllm-eval end to end on the fixture (engines)
    "scale": "KALM_SCALE",  # S3 (moto), Ray and serving replicas on loopback
}
_TIMINGS = pytest.StashKey[list[str]]()
_STARTED = pytest.StashKey[float]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_TIMINGS] = []
    config.stash[_STARTED] = time.monotonic()


def _tier_requested(config: pytest.Config, tier: str) -> bool:
    markexpr = config.getoption("markexpr") or ""
    return bool(re.search(rf"\b{tier}\b", markexpr)) or (
        os.environ.get(OPT_IN_TIERS[tier]) == "1"
    )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    for tier, variable in OPT_IN_TIERS.items():
        if _tier_requested(config, tier):
            continue
        skip = pytest.mark.skip(
            reason=f"{tier} tier: run with -m {tier} or {variable}=1"
        )
        for item in items:
            if item.get_closest_marker(tier):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tier_timing(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Record one line for the end-of-run summary of a tier's times."""
    return request.config.stash[_TIMINGS].append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash[_TIMINGS]
    if not lines:
        return
    wall = time.monotonic() - terminalreporter.config.stash[_STARTED]
    terminalreporter.section("tier times")
    for line in lines:
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"wall time of the run: {wall:.1f} s")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("kalm-tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def window_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three layers, a sliding window of 6: most test documents exceed it."""
    from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import make_checkpoint

    return make_checkpoint(
        tmp_path_factory.mktemp("kalm-window"),
        "tiny",
        seed=1,
        sliding_window=6,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )


@pytest.fixture(scope="session")
def reference(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    from kalm_t5gemma2_vllm_plugin.rerankers.reference import KaLMReranker

    return KaLMReranker(str(tiny_checkpoint), dtype="float32")


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Iterator[object]:
    """One float32 vLLM engine on the tiny checkpoint, shared within a module.

    Module scope on purpose: an in-process engine's shutdown tears down vLLM's
    process-global parallel state, so no other engine may be created and closed
    while this one is alive. Tests that build their own engines live in other
    modules.
    """
    from kalm_t5gemma2_vllm_plugin import KaLMVLLMReranker

    with KaLMVLLMReranker(str(tiny_checkpoint), dtype="float32") as reranker:
        yield reranker


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(
        tmp_path_factory.mktemp("corpus") / "corpus.jsonl", corpus_docs()
    )


@pytest.fixture(scope="session")
def store(
    tiny_checkpoint: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("store") / "store"
    result = json.loads(run_encode(tiny_checkpoint, corpus, path).stdout)
    assert result["encoded"] == len(corpus_docs())
    return path


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """moto's S3 server as a subprocess on 127.0.0.1 with one bucket
    (``S3_BUCKET``); the Lance storage options that reach it (endpoint, keys
    and allow_http always explicit: without them the SDK reaches for AWS)."""
    pytest.importorskip("moto")
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.name
                time.sleep(0.2)
        options = {
            "aws_endpoint": endpoint,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "aws_region": "us-east-1",
            "allow_http": "true",
        }
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=S3_BUCKET)
        yield options
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
