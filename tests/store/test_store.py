# SPDX-License-Identifier: Apache-2.0
"""The passage store: encode once, rank by id, survive being killed mid-write."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kalm_t5gemma2_vllm_plugin import DocumentId, KaLMVLLMReranker
from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import synthetic_text
from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError, KaLMInputError
from kalm_t5gemma2_vllm_plugin.store.format import (
    PassageStore,
    PassageStoreWriter,
    StoreIdentity,
    text_sha256,
)
from tests.helpers import QUERY, corpus_docs, run_encode, write_corpus

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path, store: Path):  # type: ignore[no-untyped-def]
    """Module engine with the store attached (and the encoder, for text)."""
    with KaLMVLLMReranker(
        str(tiny_checkpoint), dtype="float32", passage_store=str(store)
    ) as reranker:
        yield reranker


def test_scores_via_the_store_equal_scores_via_text(engine: KaLMVLLMReranker) -> None:
    docs = corpus_docs()
    before = engine.stats()
    by_id = engine.margins([(QUERY, DocumentId(doc_id)) for doc_id in docs])
    stored = engine.stats()
    assert stored["passages_from_store"] - before["passages_from_store"] == len(docs)
    assert stored["passages_encoded"] == before["passages_encoded"]  # no encoder work
    # The same passages as text share the stored rows' passage keys: the engine's
    # caches serve them, nothing is encoded.
    by_text = engine.margins([(QUERY, text) for text in docs.values()])
    assert engine.stats()["passages_encoded"] == before["passages_encoded"]
    assert max(abs(a - b) for a, b in zip(by_text, by_id, strict=True)) <= 1e-5


def test_rank_mixes_text_and_ids(engine: KaLMVLLMReranker) -> None:
    docs = corpus_docs()
    mixed = engine.rank(
        QUERY,
        [docs["doc-1"], "fresh text"],
        document_ids=["doc-2", "empty"],
        return_margin=True,
    )
    alone = engine.margins(
        [
            (QUERY, docs["doc-1"]),
            (QUERY, "fresh text"),
            (QUERY, docs["doc-2"]),
            (QUERY, ""),
        ]
    )
    for result in mixed:
        assert abs(result["margin"] - alone[result["corpus_id"]]) <= 1e-5


def test_unknown_ids_raise_a_key_error_naming_them(engine: KaLMVLLMReranker) -> None:
    # a KaLMInputError (field document_ids) that is also a KeyError
    with pytest.raises(KeyError, match=re.escape("'missing-1', 'missing-2'")) as e:
        engine.rank(QUERY, document_ids=["doc-1", "missing-1", "missing-2"])
    assert isinstance(e.value, KaLMInputError) and e.value.field == "document_ids"
    assert e.value.ids == ["missing-1", "missing-2"]


def test_store_records_what_produced_it(store: Path, tiny_checkpoint: Path) -> None:
    reader = PassageStore(store)
    assert len(reader) == len(corpus_docs())
    identity = reader.identity
    assert identity.encoder_chunk_size == 4 and identity.document_max_length == 1024
    assert identity.dtype == "float32" and identity.template_version == "kalm-v1"
    assert identity == StoreIdentity.for_engine(
        str(tiny_checkpoint), 4, 1024, "float32"
    )
    (long,) = reader.records(["long"])
    assert long.truncated and long.num_tokens == 1024 and long.rows == 256
    (empty,) = reader.records(["empty"])
    assert empty.text_sha256 == text_sha256("") and empty.num_tokens == 4
    states = reader.get(["doc-3"])[0]
    assert states.dtype == torch.float32 and states.shape[1] == 64


@pytest.mark.parametrize(
    "kwargs,mismatch",
    [
        # an engine at a multiple of the store's chunk size re-pools (accepted,
        # tests/engine/test_compression_store.py); a finer one cannot
        ({"encoder_chunk_size": 2}, "encoder_chunk_size=4 (store) vs 2 (here)"),
        (
            {"document_max_length": 512},
            "document_max_length=1024 (store) vs 512 (here)",
        ),
        ({"dtype": "bfloat16"}, "dtype='float32' (store) vs 'bfloat16' (here)"),
    ],
    ids=["chunk", "length", "dtype"],
)
def test_mismatched_settings_are_refused(
    tiny_checkpoint: Path, store: Path, kwargs: dict, mismatch: str
) -> None:
    with pytest.raises(KaLMConfigError, match=re.escape(mismatch)):
        KaLMVLLMReranker(str(tiny_checkpoint), passage_store=str(store), **kwargs)


def test_another_model_is_refused(window_checkpoint: Path, store: Path) -> None:
    with pytest.raises(KaLMConfigError, match="model_fingerprint="):
        KaLMVLLMReranker(str(window_checkpoint), passage_store=str(store))


def test_encode_refuses_other_settings_duplicates_and_a_second_writer(
    tiny_checkpoint: Path, corpus: Path, store: Path, tmp_path: Path
) -> None:
    other = run_encode(
        tiny_checkpoint, corpus, store, "--document-max-length", "64", check=False
    )
    assert other.returncode == 2
    assert "document_max_length=1024 (store) vs 64 (here)" in other.stderr

    duplicated = tmp_path / "dup.jsonl"
    duplicated.write_text(
        '{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n'
    )
    done = run_encode(tiny_checkpoint, duplicated, tmp_path / "s1", check=False)
    assert done.returncode == 2
    assert f"{duplicated}:3: duplicate id 'a' (first on line 1)" in done.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "x"}\n')
    done = run_encode(tiny_checkpoint, bad, tmp_path / "s2", check=False)
    assert done.returncode == 2 and f"{bad}:1: a row must be an object" in done.stderr

    identity = PassageStore(store).identity
    with PassageStoreWriter(store, identity):
        busy = run_encode(tiny_checkpoint, corpus, store, check=False)
    assert busy.returncode == 2
    assert "Another process is writing to passage store" in busy.stderr


def test_rerun_encodes_only_new_and_changed_passages(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    docs = {f"d{i}": synthetic_text(10 + i, seed=i) for i in range(8)}
    store = tmp_path / "store"
    first = json.loads(
        run_encode(
            tiny_checkpoint,
            write_corpus(tmp_path / "c1.jsonl", docs),
            store,
            "--batch-size",
            "3",
        ).stdout
    )
    assert (first["encoded"], first["skipped"]) == (8, 0)
    docs["d2"] = "a changed text"
    docs["d5"] = ""
    docs.update({f"new{i}": synthetic_text(5, seed=100 + i) for i in range(3)})
    second = json.loads(
        run_encode(
            tiny_checkpoint, write_corpus(tmp_path / "c2.jsonl", docs), store
        ).stdout
    )
    assert (second["encoded"], second["skipped"], second["total"]) == (5, 6, 11)
    reader = PassageStore(store)
    assert len(reader) == 11
    assert reader.records(["d2"])[0].text_sha256 == text_sha256("a changed text")
    # the replaced passages' old shards are cleaned up by the next writer
    third = json.loads(
        run_encode(
            tiny_checkpoint, write_corpus(tmp_path / "c3.jsonl", docs), store
        ).stdout
    )
    assert third["encoded"] == 0
