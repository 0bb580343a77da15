# SPDX-License-Identifier: Apache-2.0
"""A Lance passage store on S3, served by moto on 127.0.0.1: encode into it,
rank from it by id, compact it, and two writers at once.

Every store call gets the endpoint, both keys and ``allow_http`` explicitly:
without them the AWS SDK reaches for AWS itself (spike findings, issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin import DocumentId, KaLMVLLMReranker
from kalm_t5gemma2_vllm_plugin.store.lance import LanceStore, passage_table, schema_for
from kalm_t5gemma2_vllm_plugin.store.maintenance import compact_store
from tests.helpers import (
    QUERY,
    corpus_docs,
    run_encode,
    store_option_flags,
)
from tests.helpers import (
    S3_BUCKET as BUCKET,
)
from tests.store.test_lance_store import run_writers

pytestmark = pytest.mark.scale


@pytest.mark.engine
def test_rank_by_id_from_s3_equals_text_and_survives_compaction(
    s3: dict[str, str],
    tiny_checkpoint: Path,
    corpus: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = f"s3://{BUCKET}/store.lance"
    done = run_encode(tiny_checkpoint, corpus, uri, *store_option_flags(s3))  # type: ignore[arg-type]
    assert json.loads(done.stdout)["encoded"] == len(corpus_docs())
    _append_stale_rows(uri, s3, "doc-1")
    # the engine's store takes its options from the environment
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["aws_endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    docs = corpus_docs()
    with KaLMVLLMReranker(
        str(tiny_checkpoint), dtype="float32", passage_store=uri
    ) as engine:
        by_id = engine.margins([(QUERY, DocumentId(i)) for i in docs])
        by_text = engine.margins([(QUERY, text) for text in docs.values()])
        assert max(abs(a - b) for a, b in zip(by_text, by_id, strict=True)) <= 1e-5
        counts = compact_store(uri)
        assert counts == {"superseded": 1, "fragments": 1, "versions_removed": 0}
        store = engine.store
        assert isinstance(store, LanceStore) and store.refresh()
        again = engine.margins([(QUERY, DocumentId(i)) for i in docs])
        assert max(abs(a - b) for a, b in zip(again, by_id, strict=True)) <= 1e-5


def _append_stale_rows(uri: str, options: dict[str, str], passage_id: str) -> None:
    """Rows of an older encoding that a crashed writer left: random states,
    written long ago (readers must ignore them, compact removes them)."""
    import lance
    import torch

    store = LanceStore(uri, storage_options=options)
    (record,) = store.records([passage_id])
    states = torch.randn(record.rows, store.hidden_size)
    table = passage_table(
        [(record, states)],
        run_id="0" * 32,
        written_at=1,
        schema=schema_for(store.identity, store.hidden_size),
    )
    lance.write_dataset(table, uri, mode="append", storage_options=options)


def test_two_writers_on_s3_lose_nothing(s3: dict[str, str]) -> None:
    uri = f"s3://{BUCKET}/concurrent.lance"
    committed = run_writers(uri, s3, batches=4)
    assert len(committed) == 2 * 4 * 4
    reader = LanceStore(uri, storage_options=s3)
    assert set(reader.ids()) == committed and len(reader) == len(committed)
    assert len(reader.get(sorted(committed))) == len(committed)
