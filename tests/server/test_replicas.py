# SPDX-License-Identifier: Apache-2.0
"""Two ``kalm-vllm-serve`` replicas reading one Lance store on S3 (moto on
127.0.0.1): the same scores as ranking by text, and a passage appended by a
later encoding run becomes visible without a restart (``--store-refresh-s``)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from tests.helpers import QUERY, S3_BUCKET, run_encode, store_option_flags, write_corpus
from tests.server.conftest import kalm_serve

pytestmark = [pytest.mark.server, pytest.mark.scale]

DOCS = {f"r{i}": synthetic_text(30 + 7 * i, seed=500 + i) for i in range(6)}
LATE = {"late": synthetic_text(44, seed=599)}


def _margins(http: httpx.Client, body: dict[str, object]) -> dict[int, float]:
    answer = http.post("/rerank", json={"query": QUERY, "return_margin": True, **body})
    assert answer.status_code == 200, answer.text
    return {r["index"]: r["margin"] for r in answer.json()["results"]}


def test_two_replicas_share_one_s3_store_and_see_an_append(
    s3: dict[str, str], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    uri = f"s3://{S3_BUCKET}/replicas.lance"
    options = store_option_flags(s3)
    run_encode(tiny_checkpoint, write_corpus(tmp_path / "a.jsonl", DOCS), uri, *options)  # type: ignore[arg-type]
    flags = ["--passage-store", uri, *options, "--store-refresh-s", "1"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    replicas = [kalm_serve(tiny_checkpoint, tmp_path / "a", *flags)]
    try:
        replicas.append(kalm_serve(tiny_checkpoint, tmp_path / "b", *flags))
        by_id = []
        for replica in replicas:
            with httpx.Client(
                base_url=replica.url, trust_env=False, timeout=60
            ) as http:
                stored = _margins(http, {"document_ids": list(DOCS)})
                text = _margins(http, {"documents": list(DOCS.values())})
                assert max(abs(stored[i] - text[i]) for i in text) <= 1e-5
                by_id.append(stored)
        assert max(abs(by_id[0][i] - by_id[1][i]) for i in by_id[0]) <= 1e-6

        with httpx.Client(
            base_url=replicas[1].url, trust_env=False, timeout=60
        ) as http:
            missing = http.post(
                "/rerank", json={"query": QUERY, "document_ids": ["late"]}
            )
            assert missing.status_code == 404, missing.text
            # a later encoding run appends while both replicas serve
            run_encode(
                tiny_checkpoint,
                write_corpus(tmp_path / "b.jsonl", LATE),
                uri,
                *options,  # type: ignore[arg-type]
            )
            appended = time.monotonic()
            while True:
                answer = http.post(
                    "/rerank",
                    json={
                        "query": QUERY,
                        "document_ids": ["late"],
                        "return_margin": True,
                    },
                )
                if answer.status_code == 200 or time.monotonic() - appended > 30:
                    break
                time.sleep(0.2)
            waited = time.monotonic() - appended
            print(
                f"\nappended passage visible to the running replica after {waited:.1f} s"
            )
            assert answer.status_code == 200, answer.text
            text = _margins(http, {"documents": list(LATE.values())})
            assert abs(answer.json()["results"][0]["margin"] - text[0]) <= 1e-5
    finally:
        for replica in replicas:
            assert replica.stop() == 0, replica.log.read_text()[-3000:]
