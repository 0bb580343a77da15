# SPDX-License-Identifier: Apache-2.0
"""The passage store as a Lance dataset on a local path: the directory store's
behaviours, newest rows winning, compaction, migration and concurrent writers."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import lance
import pytest
import torch

from kalm_t5gemma2_vllm_plugin.cli import store as store_cli
from kalm_t5gemma2_vllm_plugin.errors import (
    CorruptStoreError,
    KaLMConfigError,
    KaLMInputError,
)
from kalm_t5gemma2_vllm_plugin.store.format import PassageStore, StoreIdentity
from kalm_t5gemma2_vllm_plugin.store.lance import (
    LanceStore,
    LanceStoreWriter,
    passage_table,
    schema_for,
)
from kalm_t5gemma2_vllm_plugin.store.uri import (
    is_lance_uri,
    open_store,
    open_writer,
    parse_store_options,
    storage_options_from_env,
)
from tests.helpers import corpus_docs, run_encode
from tests.store.lance_writer import HIDDEN, IDENTITY, synthetic

REPO = Path(__file__).resolve().parents[2]


def _store_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = store_cli.main(list(argv))
    return code, out.getvalue()


def _assert_same(a: object, b: object) -> None:
    """Two stores hold the same documents, records and states."""
    ids = a.ids()  # type: ignore[attr-defined]
    assert ids == b.ids()  # type: ignore[attr-defined]
    windows = a.window_records(ids)  # type: ignore[attr-defined]
    assert windows == b.window_records(ids)  # type: ignore[attr-defined]
    keys = [(r.id, r.window) for i in ids for r in windows[i]]
    for (ra, sa), (rb, sb) in zip(
        a.load_windows(keys),  # type: ignore[attr-defined]
        b.load_windows(keys),  # type: ignore[attr-defined]
        strict=True,
    ):
        assert ra == rb and sa.dtype == sb.dtype and torch.equal(sa, sb)


@pytest.fixture(scope="module")
def lance_store(store: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's directory store migrated into a Lance store."""
    target = str(tmp_path_factory.mktemp("lance") / "store.lance")
    code, output = _store_cli("migrate", str(store), target)
    assert code == 0, output
    assert json.loads(output)["documents"] == len(corpus_docs())
    return target


def test_which_locations_are_lance_stores() -> None:
    for lance_uri in ("s3://b/s", "gs://b/s", "az://b/s", "file:///x", "./x.lance/"):
        assert is_lance_uri(lance_uri)
    for directory in ("./store", "/srv/kalm-store", "x.lance.bak"):
        assert not is_lance_uri(directory)


def test_storage_options_come_from_the_env_and_the_flag() -> None:
    env = {
        "AWS_ENDPOINT": "http://b",
        "AWS_ENDPOINT_URL": "http://a",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_REGION": "eu-west-1",
        "AWS_ALLOW_HTTP": "true",
    }
    assert storage_options_from_env(env) == {
        "aws_endpoint": "http://a",  # AWS_ENDPOINT_URL first
        "aws_access_key_id": "id",
        "aws_secret_access_key": "secret",
        "aws_region": "eu-west-1",
        "allow_http": "true",
    }
    flags = ["aws_region=x", "allow_http=true", "aws_region=y=z"]
    assert parse_store_options(flags, "--store-option") == {
        "aws_region": "y=z",
        "allow_http": "true",
    }
    with pytest.raises(KaLMInputError, match="--store-option takes KEY=VALUE"):
        parse_store_options(["aws_region"], "--store-option")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_of_windows_in_each_dtype(tmp_path: Path, dtype: str) -> None:
    identity = StoreIdentity("f" * 32, 4, 1024, "kalm-v1", dtype)
    uri = str(tmp_path / "s.lance")
    items = [
        (r, s.to(getattr(torch, dtype)))
        for i in range(3)
        for r, s in synthetic(f"d{i}", 1 + i, seed=i)
    ]
    with open_writer(uri, identity) as writer:
        assert writer.text_hashes() == {}
        assert writer.write(items) == 6
        assert writer.text_hashes()["d2"] == ("0" * 64, 3, False)
    reader = open_store(uri, identity)
    assert isinstance(reader, LanceStore) and reader.hidden_size == HIDDEN
    assert len(reader) == 3 and reader.ids() == ["d0", "d1", "d2"]
    assert [r.window for r in reader.window_records(["d2"])["d2"]] == [0, 1, 2]
    keys = [("d2", 1), ("d0", 0), ("d2", 1)]
    for (record, states), key in zip(reader.load_windows(keys), keys, strict=True):
        want = next(s for r, s in items if (r.id, r.window) == key)
        assert (record.id, record.window) == key
        assert states.dtype == want.dtype and torch.equal(states, want)
    assert [r.id for r in reader.records(["d1", "d0"])] == ["d1", "d0"]
    assert torch.equal(reader.get(["d1"])[0], items[1][1])


def test_unknown_ids_and_windows_are_named(lance_store: str) -> None:
    reader = open_store(lance_store)
    message = (
        "Unknown document id(s) in passage store store.lance: 'missing-1', 'missing-2'."
    )
    for lookup in (reader.records, reader.get, reader.window_records):
        with pytest.raises(KeyError, match=re.escape(message)) as error:
            lookup(["doc-1", "missing-1", "missing-2"])
        assert error.value.ids == ["missing-1", "missing-2"]  # type: ignore[attr-defined]
    with pytest.raises(KeyError, match="holds no window 3 of document 'doc-1'"):
        reader.load_windows([("doc-1", 3)])


def test_other_settings_are_refused(lance_store: str, tmp_path: Path) -> None:
    identity = open_store(lance_store).identity
    other = StoreIdentity(identity.model_fingerprint, 4, 512, "kalm-v1", "float32")
    with pytest.raises(
        KaLMConfigError,
        match=re.escape("document_max_length=1024 (store) vs 512 (here)"),
    ):
        open_store(lance_store, other)
    with pytest.raises(KaLMConfigError, match="document_max_length=1024"):
        open_writer(lance_store, other)
    # an engine pooling coarser (a multiple of the store's chunk) reads it
    coarser = StoreIdentity(identity.model_fingerprint, 8, 1024, "kalm-v1", "float32")
    open_store(lance_store, coarser)
    with pytest.raises(KaLMConfigError, match="No passage store at"):
        open_store(str(tmp_path / "none.lance"))


def test_kalm_vllm_encode_writes_a_lance_store_like_the_directory_one(
    tiny_checkpoint: Path, corpus: Path, store: Path, tmp_path: Path
) -> None:
    uri = str(tmp_path / "encoded.lance")
    first = json.loads(run_encode(tiny_checkpoint, corpus, uri).stdout)  # type: ignore[arg-type]
    assert first["encoded"] == len(corpus_docs())
    again = json.loads(run_encode(tiny_checkpoint, corpus, uri).stdout)  # type: ignore[arg-type]
    assert (again["encoded"], again["skipped"]) == (0, len(corpus_docs()))
    reader, directory = open_store(uri), PassageStore(store)
    assert reader.identity == directory.identity
    ids = reader.ids()
    assert ids == directory.ids()
    assert reader.records(ids) == directory.records(ids)
    for a, b in zip(reader.get(ids), directory.get(ids), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def _corrupt(uri: str, passage_id: str) -> int:
    """Rewrite one row's states (a flipped bit, the old CRC); its fragment."""
    import pyarrow as pa

    dataset = lance.dataset(uri)
    row = dataset.to_table(filter=f"id = '{passage_id}'")
    data = bytearray(row.column("states")[0].as_py())
    data[len(data) // 2] ^= 0x04
    index = row.schema.get_field_index("states")
    row = row.set_column(index, "states", pa.array([bytes(data)], pa.binary()))
    dataset.merge_insert(["id", "window"]).when_matched_update_all().execute(row)
    found = lance.dataset(uri).to_table(
        filter=f"id = '{passage_id}'", with_row_address=True
    )
    return int(found.column("_rowaddr")[0].as_py()) >> 32


def test_a_corrupt_row_names_the_passage_and_fragment(
    store: Path, tmp_path: Path
) -> None:
    uri = str(tmp_path / "store.lance")
    assert _store_cli("migrate", str(store), uri)[0] == 0
    fragment = _corrupt(uri, "doc-3")
    reader = open_store(uri)
    for read in (reader.get, reader.load):
        with pytest.raises(CorruptStoreError) as error:
            read(["doc-1", "doc-3"])
        assert (error.value.passage_id, error.value.file) == (
            "doc-3",
            f"fragment {fragment}",
        )
        assert (
            f"Passage 'doc-3' in passage store store.lance: its states in Lance "
            f"fragment {fragment} fail their checksum." in str(error.value)
        )
        assert str(tmp_path) not in str(error.value)
    others = [i for i in corpus_docs() if i != "doc-3"]
    assert len(reader.get(others)) == len(others)
    code, output = _store_cli("verify", uri)
    assert code == 1
    assert (
        f"CORRUPT fragment {fragment}: passage 'doc-3': its states (window 0) fail their checksum"
        in output
    )
    code, output = _store_cli("verify", uri, "--json")
    assert json.loads(output)["corrupt_passages"] == ["doc-3"]


def test_verify_and_compact_of_a_sound_store(lance_store: str, store: Path) -> None:
    code, output = _store_cli("verify", lance_store)
    assert code == 0 and output.endswith("passages in 1 fragments checked: OK\n"), (
        output
    )
    code, output = _store_cli("compact", str(store))
    assert code == 0 and "a directory store has nothing to compact" in output


def test_newest_rows_win_and_compact_drops_the_rest(tmp_path: Path) -> None:
    uri = str(tmp_path / "s.lance")
    writer = LanceStoreWriter(uri, IDENTITY)
    writer.write(synthetic("a", 2, seed=1) + synthetic("b", 1, seed=2))
    before = LanceStore(uri).load_windows([("a", 0), ("a", 1), ("b", 0)])
    schema = schema_for(IDENTITY, HIDDEN)
    now = time.time_ns()
    # a writer that crashed between its commits, long ago: stale rows of "a"
    stale = passage_table(
        synthetic("a", 3, seed=9), run_id="0" * 32, written_at=1, schema=schema
    )
    # a writer that crashed between its commits just now: "b" in 2 windows
    newer = passage_table(
        synthetic("b", 2, seed=7), run_id="f" * 32, written_at=now, schema=schema
    )
    for table in (stale, newer):
        lance.write_dataset(table, uri, mode="append")
    reader = LanceStore(uri)
    assert [r.windows for r in reader.records(["a", "b"])] == [2, 2]
    got = reader.load_windows([("a", 0), ("a", 1), ("b", 1)])
    assert all(
        torch.equal(g[1], w[1]) for g, w in zip(got[:2], before[:2], strict=True)
    )
    assert torch.equal(got[2][1], synthetic("b", 2, seed=7)[1][1])
    code, output = _store_cli("verify", uri)
    assert code == 0 and "4 superseded row(s)" in output, output
    counts = writer.compact(older_than=timedelta(0))
    assert counts["superseded"] == 4 and counts["fragments"] == 1
    assert reader.refresh() and lance.dataset(uri).count_rows() == 4
    assert torch.equal(reader.load_windows([("b", 1)])[0][1], got[2][1])
    code, output = _store_cli("verify", uri)
    assert code == 0 and "note" not in output, output


def test_refresh_sees_another_writers_append(tmp_path: Path) -> None:
    uri = str(tmp_path / "s.lance")
    LanceStoreWriter(uri, IDENTITY).write(synthetic("a", 1, seed=1))
    reader = LanceStore(uri)
    assert not reader.refresh()
    LanceStoreWriter(uri, IDENTITY).write(synthetic("b", 1, seed=2))
    assert reader.ids() == ["a"]  # the version it read
    version = reader.version
    assert reader.refresh() and reader.version > version
    assert reader.ids() == ["a", "b"]


def test_migrate_round_trip_equals_the_source(
    lance_store: str, store: Path, tmp_path: Path
) -> None:
    _assert_same(open_store(lance_store), PassageStore(store))
    back = tmp_path / "back"
    code, output = _store_cli("migrate", lance_store, str(back))
    assert code == 0, output
    _assert_same(PassageStore(back), PassageStore(store))


def run_writers(uri: str, options: dict[str, str] | None, batches: int) -> set[str]:
    """Two writer processes appending at once; the ids they saw committed."""
    start_at = time.time() + 4  # after both have imported torch and lance
    extra = [json.dumps(options)] if options else []
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.store.lance_writer",
                uri,
                name,
                str(batches),
                str(start_at),
                *extra,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("w1", "w2")
    ]
    committed: set[str] = set()
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        committed.update(i for line in out.splitlines() for i in json.loads(line))
    return committed


def test_two_processes_appending_at_once_lose_nothing(tmp_path: Path) -> None:
    uri = str(tmp_path / "s.lance")
    committed = run_writers(uri, None, batches=10)
    assert len(committed) == 2 * 10 * 4
    reader = LanceStore(uri)
    assert set(reader.ids()) == committed and len(reader) == len(committed)
    code, output = _store_cli("verify", uri)
    assert code == 0, output
