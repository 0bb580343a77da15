# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-encode --ray``: a real local Ray instance (one per module; it is
slow to start on two cores) encoding into Lance stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
lance = pytest.importorskip("lance")

from kalm_t5gemma2_vllm_plugin import DocumentId, KaLMVLLMReranker  # noqa: E402
from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text  # noqa: E402
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError  # noqa: E402
from kalm_t5gemma2_vllm_plugin.store.format import (  # noqa: E402
    PassageStore,
    StoreIdentity,
)
from kalm_t5gemma2_vllm_plugin.store.lance import LanceStore  # noqa: E402
from kalm_t5gemma2_vllm_plugin.store.ray_encode import (  # noqa: E402
    CRASH_MARKER_ENV,
    encode_corpus_ray,
)
from tests.helpers import (  # noqa: E402
    QUERY,
    S3_BUCKET,
    corpus_docs,
    encode_args,
    run_encode,
    write_corpus,
)

pytestmark = [
    pytest.mark.scale,
    pytest.mark.timeout(300),
    # Ray forks its workers after this process imported lance; they never
    # touch a dataset opened here.
    pytest.mark.filterwarnings("ignore:lance is not fork-safe:UserWarning"),
]


@pytest.fixture(scope="module")
def crash_marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """While this file exists, the first encoder batch to find it kills its actor."""
    return tmp_path_factory.mktemp("crash") / "crash-once"


@pytest.fixture(scope="module")
def ray_address(crash_marker: Path) -> Iterator[str]:
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {CRASH_MARKER_ENV: str(crash_marker)}},
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _encode(
    checkpoint: Path, corpus: str, store: str, **kwargs: object
) -> dict[str, int]:
    return encode_corpus_ray(
        None,
        str(checkpoint),
        corpus,
        store,
        identity=StoreIdentity.for_engine(str(checkpoint), 4, 1024, "float32"),
        chunk_size=4,
        document_max_length=1024,
        dtype="float32",
        **{"batch_size": 4, "commit_every": 4, "workers": 2, **kwargs},  # type: ignore[arg-type]
    )


def _rows(uri: str, **options: str) -> list[tuple[str, int]]:
    table = lance.dataset(uri, storage_options=options or None).to_table(
        columns=["id", "window"]
    )
    ids, windows = table.column("id").to_pylist(), table.column("window").to_pylist()
    return list(zip(ids, windows, strict=True))


@pytest.mark.engine
def test_ray_encode_equals_the_single_process_encode_and_scores_like_text(
    ray_address: str, tiny_checkpoint: Path, corpus: Path, store: Path, tmp_path: Path
) -> None:
    uri = str(tmp_path / "ray.lance")
    done = run_encode(
        tiny_checkpoint, corpus, Path(uri), "--ray", "--commit-every", "4",
        "--ray-workers", "2", "--batch-size", "4",
    )  # fmt: skip
    docs = corpus_docs()
    counts = json.loads(done.stdout)
    assert counts["encoded"] == counts["total"] == len(docs)
    assert counts["commits"] == -(-len(docs) // 4) >= 3
    assert len(lance.dataset(uri).versions()) >= counts["commits"] + 1
    assert sorted(_rows(uri)) == sorted((i, 0) for i in docs)  # each once
    stored, single = LanceStore(uri), PassageStore(store)
    assert sorted(stored.ids()) == sorted(single.ids())
    for (record, states), (expected, reference) in zip(
        stored.load(list(docs)), single.load(list(docs)), strict=True
    ):
        assert record == expected
        assert (states - reference).abs().max().item() <= 1e-6
    single.close()
    with KaLMVLLMReranker(
        str(tiny_checkpoint), dtype="float32", passage_store=uri
    ) as reranker:
        by_id = reranker.margins([(QUERY, DocumentId(i)) for i in docs])
        by_text = reranker.margins([(QUERY, text) for text in docs.values()])
    assert max(abs(a - b) for a, b in zip(by_id, by_text, strict=True)) <= 1e-5


def test_a_killed_encoder_actor_is_restarted_and_each_passage_stored_once(
    ray_address: str,
    crash_marker: Path,
    tiny_checkpoint: Path,
    corpus: Path,
    tmp_path: Path,
) -> None:
    uri = str(tmp_path / "crash.lance")
    crash_marker.touch()
    counts = _encode(tiny_checkpoint, str(corpus), uri)
    assert not crash_marker.exists()  # an actor did die on it
    assert counts["encoded"] == counts["windows"] == len(corpus_docs())
    rows = _rows(uri)
    assert sorted(rows) == sorted((i, 0) for i in corpus_docs())


def test_a_killed_driver_resumes_after_its_last_commit(
    ray_address: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    docs = {f"p{i:03d}": synthetic_text(5 + i % 17, seed=300 + i) for i in range(120)}
    corpus = write_corpus(tmp_path / "corpus.jsonl", docs)
    uri = str(tmp_path / "killed.lance")
    args = encode_args(tiny_checkpoint, corpus, Path(uri), "--ray", ray_address)
    extra = ["--commit-every", "2", "--ray-workers", "1", "--encoder-chunk-size", "4"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "kalm_t5gemma2_vllm_plugin.cli.encode", *args, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    try:
        while not (os.path.isdir(uri) and lance.dataset(uri).count_rows()):
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    committed = {i for i, _ in _rows(uri)}
    assert 0 < len(committed) < len(docs)
    counts = _encode(tiny_checkpoint, str(corpus), uri, commit_every=50)
    assert counts["skipped"] == len(committed)
    assert counts["encoded"] == len(docs) - len(committed)
    assert sorted(_rows(uri)) == sorted((i, 0) for i in docs)  # nothing twice


def test_a_malformed_row_stops_the_run_naming_its_line(
    ray_address: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"id": "a", "text": "x"}\n{"id": 5, "text": "y"}\n')
    with pytest.raises(KaLMInputError, match=r"bad\.jsonl:2: a row must be"):
        _encode(tiny_checkpoint, str(corpus), str(tmp_path / "bad.lance"))
    assert not (tmp_path / "bad.lance").exists()


def test_ray_encode_reads_parquet_from_s3_into_an_s3_store(
    ray_address: str,
    tiny_checkpoint: Path,
    s3: dict[str, str],
    tmp_path: Path,
) -> None:
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = corpus_docs()
    local = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(docs), "text": list(docs.values())}), local)
    boto3.client(
        "s3",
        endpoint_url=s3["aws_endpoint"],
        region_name=s3["aws_region"],
        aws_access_key_id=s3["aws_access_key_id"],
        aws_secret_access_key=s3["aws_secret_access_key"],
    ).upload_file(str(local), S3_BUCKET, "ray/corpus.parquet")
    uri = f"s3://{S3_BUCKET}/ray/store.lance"
    counts = _encode(
        tiny_checkpoint,
        f"s3://{S3_BUCKET}/ray/corpus.parquet",
        uri,
        storage_options=s3,
    )
    assert counts["encoded"] == len(docs)
    assert sorted(_rows(uri, **s3)) == sorted((i, 0) for i in docs)
