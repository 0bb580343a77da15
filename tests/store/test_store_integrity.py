# SPDX-License-Identifier: Apache-2.0
"""A damaged passage store is an error naming the passage and the file, never
wrong scores or "unknown id" (hostile findings F4); ``kalm-vllm-store verify``
checks a whole store."""

from __future__ import annotations

import json
import random
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from kalm_t5gemma2_vllm_plugin.errors import CorruptStoreError, KaLMConfigError
from kalm_t5gemma2_vllm_plugin.server.errors import api_error
from kalm_t5gemma2_vllm_plugin.store.format import (
    PassageRecord,
    PassageStore,
    PassageStoreWriter,
    StoreIdentity,
    text_sha256,
)
from tests.helpers import QUERY, corpus_docs

IDENTITY = StoreIdentity("f" * 32, 4, 1024, "kalm-v1", "float32")
STORE_CLI = Path(sys.executable).with_name("kalm-vllm-store")


def _copy(store: Path, tmp_path: Path) -> Path:
    """A private copy: the session's ``store`` fixture must stay intact."""
    return Path(shutil.copytree(store, tmp_path / "store"))


def _located(root: Path, passage_id: str) -> tuple[str, str]:
    db = sqlite3.connect(root / "index.sqlite")
    try:
        shard, tensor = db.execute(
            "SELECT shard, tensor FROM passages WHERE id = ?", (passage_id,)
        ).fetchone()
    finally:
        db.close()
    return shard, tensor


def _flip_a_byte(root: Path, passage_id: str) -> str:
    """Flip one bit in the middle of the passage's states; the shard's name."""
    shard, tensor = _located(root, passage_id)
    path = root / "shards" / shard
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + header_size])[tensor]["data_offsets"]
    data[8 + header_size + (start + end) // 2] ^= 0x04
    path.write_bytes(bytes(data))
    return shard


def _verify(root: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STORE_CLI), "verify", str(root), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _index_page(root: Path, name: str) -> int:
    """Byte offset of the root page of table or index ``name`` in the index."""
    db = sqlite3.connect(root / "index.sqlite")
    try:
        (page,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)
        ).fetchone()
        (size,) = db.execute("PRAGMA page_size").fetchone()
    finally:
        db.close()
    return int((page - 1) * size)


def test_a_flipped_byte_names_the_passage_and_shard_and_the_rest_still_reads(
    store: Path, tmp_path: Path
) -> None:
    root = _copy(store, tmp_path)
    shard = _flip_a_byte(root, "doc-3")
    reader = PassageStore(root)
    others = [i for i in corpus_docs() if i != "doc-3"]
    try:
        for read in (reader.get, reader.load):
            with pytest.raises(CorruptStoreError) as error:
                read(["doc-1", "doc-3", "doc-5"])
            assert (error.value.passage_id, error.value.file) == ("doc-3", shard)
            message = str(error.value)
            assert (
                f"Passage 'doc-3' in passage store store: its states in shard file "
                f"{shard} fail their checksum." in message
            )
            assert str(tmp_path) not in message  # names only (F14)
        intact = PassageStore(store)
        try:
            for got, want in zip(reader.get(others), intact.get(others), strict=True):
                assert torch.equal(got, want)
        finally:
            intact.close()
    finally:
        reader.close()


def test_the_http_face_of_a_damaged_passage_is_a_500_naming_it(
    store: Path, tmp_path: Path
) -> None:
    root = _copy(store, tmp_path)
    shard = _flip_a_byte(root, "doc-2")
    reader = PassageStore(root)
    try:
        with pytest.raises(CorruptStoreError) as error:
            reader.load(["doc-2"])
    finally:
        reader.close()
    mapped = api_error(error.value)
    assert (mapped.status, mapped.type) == (500, "corrupt_store")
    assert "'doc-2'" in mapped.message and shard in mapped.message
    assert str(tmp_path) not in mapped.message


def test_verify_names_the_damaged_passage_and_passes_a_clean_copy(
    store: Path, tmp_path: Path
) -> None:
    clean = _copy(store, tmp_path / "clean")
    passed = _verify(clean)
    assert passed.returncode == 0, passed.stderr
    count = len(corpus_docs())
    assert passed.stdout.endswith(f"{count} passages in 1 shards checked: OK\n")

    damaged = _copy(store, tmp_path / "damaged")
    shard = _flip_a_byte(damaged, "doc-7")
    failed = _verify(damaged)
    assert failed.returncode == 1, failed.stderr
    assert (
        f"CORRUPT shards/{shard}: passage 'doc-7': its states do not match their "
        f"checksum\n" in failed.stdout
    )
    assert f"CORRUPT shards/{shard}: does not match its sha256\n" in failed.stdout
    report = json.loads(_verify(damaged, "--json").stdout)
    assert report["ok"] is False and report["passages"] == count
    assert report["corrupt_passages"] == ["doc-7"]


def _synthetic_store(root: Path) -> Path:
    """Two shards of four passages each, all of the same shape."""
    generator = torch.Generator().manual_seed(0)
    with PassageStoreWriter(root, IDENTITY) as writer:
        for batch in range(2):
            writer.write(
                (
                    PassageRecord(
                        f"p{batch}-{i}", text_sha256(f"{i}"), 3, 12, False, "k"
                    ),
                    torch.randn(3, 8, generator=generator),
                )
                for i in range(4)
            )
    return root


def test_swapped_shards_of_the_same_size_are_caught(tmp_path: Path) -> None:
    """Same tensor count and shapes, so sizes agree: only the checksums see it."""
    root = _synthetic_store(tmp_path / "store")
    first, second = (_located(root, f"p{b}-0")[0] for b in range(2))
    shards = root / "shards"
    (shards / first).rename(shards / "swap")
    (shards / second).rename(shards / first)
    (shards / "swap").rename(shards / second)
    reader = PassageStore(root)
    try:
        with pytest.raises(CorruptStoreError, match=re.escape("fail their checksum")):
            reader.load(["p1-2"])
    finally:
        reader.close()
    done = _verify(root, "--json")
    assert done.returncode == 1
    assert sorted(json.loads(done.stdout)["corrupt_passages"]) == sorted(
        f"p{b}-{i}" for b in range(2) for i in range(4)
    )


def test_the_recorded_count_follows_new_and_replaced_passages(
    tmp_path: Path,
) -> None:
    root = _synthetic_store(tmp_path / "store")
    with PassageStoreWriter(root, IDENTITY) as writer:
        # one replaced, one new twice in the same batch
        writer.write(
            (PassageRecord(i, text_sha256(i), 1, 4, False, "k"), torch.zeros(1, 8))
            for i in ("p0-1", "new", "new")
        )
    db = sqlite3.connect(root / "index.sqlite")
    (recorded,) = db.execute("SELECT value FROM meta WHERE key = 'passages'").fetchone()
    db.close()
    assert recorded == "9"
    reader = PassageStore(root)
    try:
        assert len(reader) == 9
        assert [r.rows for r in reader.records(["p0-1", "new"])] == [1, 1]
    finally:
        reader.close()
    assert _verify(root).returncode == 0


def test_rows_lost_behind_the_recorded_count_refuse_the_store(
    store: Path, tmp_path: Path
) -> None:
    root = _copy(store, tmp_path)
    db = sqlite3.connect(root / "index.sqlite")
    db.execute("DELETE FROM passages WHERE id IN ('doc-1', 'unicode')")
    db.commit()
    db.close()
    count = len(corpus_docs())
    expected = (
        f"Passage store store: index.sqlite holds {count - 2} passage rows but "
        f"recorded {count}"
    )
    with pytest.raises(CorruptStoreError, match=re.escape(expected)):
        PassageStore(root)
    intact = PassageStore(store)
    identity = intact.identity
    intact.close()
    with pytest.raises(CorruptStoreError, match=re.escape(expected)):
        PassageStoreWriter(root, identity)  # would append to a damaged index
    done = _verify(root)
    assert done.returncode == 1
    assert (
        f"CORRUPT index.sqlite: holds {count - 2} passage rows but recorded {count}\n"
        in done.stdout
    )


def test_damaged_index_pages_refuse_the_store_instead_of_unknown_ids(
    store: Path, tmp_path: Path
) -> None:
    """F4's damage (500 random bytes in a page), here on the id index's page:
    before, the store opened, counted every passage, and every stored id
    answered "unknown"."""
    root = _copy(store, tmp_path)
    offset = _index_page(root, "sqlite_autoindex_passages_1")
    with open(root / "index.sqlite", "r+b") as f:
        f.seek(offset + 8)  # past the page header: the cell pointers and cells
        f.write(random.Random(0).randbytes(500))
    with pytest.raises(CorruptStoreError, match="index.sqlite is damaged") as error:
        PassageStore(root)
    assert "quick_check" in str(error.value) and error.value.file == "index.sqlite"
    done = _verify(root)
    assert done.returncode == 1
    assert "CORRUPT index.sqlite: SQLite: " in done.stdout


def test_a_writer_runs_the_full_check_before_it_deletes_anything(
    tmp_path: Path,
) -> None:
    """An index that disagrees with its table passes ``quick_check`` (the
    reader's open), not ``integrity_check``; a writer, which deletes the
    shards the index says are unused, must not trust it."""
    root = _synthetic_store(tmp_path / "store")
    db = sqlite3.connect(root / "index.sqlite")
    db.execute("PRAGMA writable_schema=ON")
    db.execute(
        "UPDATE sqlite_master SET sql = 'CREATE INDEX passages_by_shard ON "
        "passages (tensor)' WHERE name = 'passages_by_shard'"
    )
    db.commit()
    db.close()
    PassageStore(root).close()  # the cheap check at open does not see it
    with pytest.raises(
        CorruptStoreError, match="SQLite integrity_check: row 1 missing"
    ):
        PassageStoreWriter(root, IDENTITY)
    assert len(list((root / "shards").iterdir())) == 2
    done = _verify(root)
    assert done.returncode == 1
    assert "CORRUPT index.sqlite: SQLite: row 1 missing from index" in done.stdout


def test_an_old_format_store_is_refused_with_a_way_out(
    store: Path, tmp_path: Path
) -> None:
    root = _copy(store, tmp_path)
    db = sqlite3.connect(root / "index.sqlite")
    (raw,) = db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
    old = {**json.loads(raw), "format_version": 3}
    db.execute("UPDATE meta SET value = ? WHERE key = 'identity'", (json.dumps(old),))
    db.commit()
    db.close()
    expected = "has format version 3; this version reads format 4 only. Re-encode"
    with pytest.raises(KaLMConfigError, match=re.escape(expected)):
        PassageStore(root)
    with pytest.raises(KaLMConfigError, match=re.escape(expected)):
        PassageStoreWriter(root, IDENTITY)
    done = _verify(root)
    assert done.returncode == 2 and expected in done.stderr


def test_verify_of_no_store_is_a_usage_error(tmp_path: Path) -> None:
    done = _verify(tmp_path / "absent")
    assert done.returncode == 2
    assert done.stderr == (
        f"kalm-vllm-store: error: No passage store at {tmp_path / 'absent'} "
        f"(no index.sqlite).\n"
    )


@pytest.mark.server
def test_a_server_answers_a_damaged_passage_with_a_json_500_naming_it(
    tiny_checkpoint: Path, store: Path, tmp_path: Path
) -> None:
    """The whole path: no 200 with wrong scores, and clean ids still score."""
    from tests.server.conftest import kalm_serve

    root = _copy(store, tmp_path)
    shard = _flip_a_byte(root, "doc-4")
    running = kalm_serve(
        tiny_checkpoint, tmp_path, "--passage-store", str(root), "--decoder-only"
    )
    try:
        with httpx.Client(base_url=running.url, trust_env=False, timeout=120) as http:
            bad = http.post(
                "/rerank", json={"query": QUERY, "document_ids": ["doc-1", "doc-4"]}
            )
            good = http.post(
                "/rerank", json={"query": QUERY, "document_ids": ["doc-1", "doc-5"]}
            )
    finally:
        assert running.stop() == 0
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["type"] == "corrupt_store"
    assert "'doc-4'" in error["message"] and shard in error["message"]
    assert str(tmp_path) not in error["message"]
    assert good.status_code == 200 and len(good.json()["results"]) == 2
