# SPDX-License-Identifier: Apache-2.0
"""The passage store as a Lance dataset, on a local path or an object store URI.

Two formats, one interface. The directory store (``format.py``: SQLite plus
safetensors shards) stays the simple local format with no dependency beyond
the plugin's, and one writer. This format is for object storage (``s3://``,
``gs://``, ``az://``), many concurrent writers and many serving replicas:
Lance commits a manifest per version with a conditional put, so writers on S3
need no lock, and readers see whole versions only. ``kalm-vllm-store migrate``
moves a store from one format to the other, verified row by row. Which format a
location is: ``uri.py``.

One row per passage window (``PASSAGE_SCHEMA``); the schema metadata holds the
store identity (``kalm_identity``), ``kalm_store_format`` (``"lance-1"``) and
the states' hidden size. ``states`` are the raw bytes of the ``[rows, hidden]``
tensor in C order and the identity's dtype (bf16 as its bit pattern), checked
against ``states_crc32`` (``format.states_crc32``) on every read.

Writes. ``LanceStoreWriter.write`` appends a batch (every window of a document
is in one batch) as one commit, then deletes the rows of the same ids written
before it (``supersede``) as a second commit. Readers count only each id's
newest rows (greatest ``written_at``, then greatest ``run_id``), so a crash
between the two commits leaves a store that reads correctly, and two writers
never delete each other's newer rows. Writers' clocks must agree better than
the time between two writes of one document. ``compact`` deletes what older
rows remain, rewrites small fragments, rebuilds the BTREE index on ``id`` that
lookups need (fragments appended since the last compaction are scanned) and
removes versions older than it is told to keep: readers still on those fail.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import pyarrow as pa

from kalm_t5gemma2_vllm_plugin.errors import (
    CorruptStoreError,
    KaLMConfigError,
    UnknownDocumentError,
)
from kalm_t5gemma2_vllm_plugin.store.format import (
    PassageRecord,
    StoreIdentity,
    _check,
    states_crc32,
)

__all__ = [
    "LANCE_STORE_FORMAT",
    "PASSAGE_SCHEMA",
    "LanceStore",
    "LanceStoreWriter",
    "passage_table",
    "schema_for",
]

LANCE_STORE_FORMAT = "lance-1"
PASSAGE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("window", pa.int32()),
        pa.field("windows", pa.int32()),
        pa.field("token_start", pa.int32()),
        pa.field("token_end", pa.int32()),
        pa.field("text_sha256", pa.string()),
        pa.field("num_tokens", pa.int32()),
        pa.field("rows", pa.int32()),
        pa.field("truncated", pa.bool_()),
        pa.field("passage_key", pa.string()),
        pa.field("states", pa.binary()),
        pa.field("states_crc32", pa.uint32()),
        pa.field("run_id", pa.string()),
        pa.field("written_at", pa.int64()),
    ]
)
_IDENTITY, _FORMAT, _HIDDEN = (
    b"kalm_identity",
    b"kalm_store_format",
    b"kalm_hidden_size",
)
#: What a record needs, and what orders a document's rows (newest first).
_RECORD = [
    "id",
    "window",
    "windows",
    "token_start",
    "token_end",
    "text_sha256",
    "num_tokens",
    "rows",
    "truncated",
    "passage_key",
]
_VERSION = ["written_at", "run_id"]
#: ids per ``IN`` filter.
_CHUNK = 1000


def schema_for(identity: StoreIdentity, hidden: int) -> pa.Schema:
    """``PASSAGE_SCHEMA`` with the metadata of a store of ``identity``."""
    return PASSAGE_SCHEMA.with_metadata(
        {
            _IDENTITY: json.dumps(asdict(identity)).encode(),
            _FORMAT: LANCE_STORE_FORMAT.encode(),
            _HIDDEN: str(int(hidden)).encode(),
        }
    )


def passage_table(
    items: Iterable[tuple[PassageRecord, Any]],
    *,
    run_id: str,
    written_at: int,
    schema: pa.Schema,
) -> pa.Table:
    """One batch's rows; ``schema`` from ``schema_for`` (states are checked
    against its dtype and hidden size). A key twice: the last one wins."""
    import torch

    identity, hidden = read_metadata(schema, "this batch")
    dtype = getattr(torch, identity.dtype)
    rows: dict[tuple[str, int], tuple[PassageRecord, Any]] = {}
    for record, states in items:
        states = states.detach().to("cpu").contiguous()
        if states.dtype != dtype or list(states.shape) != [record.rows, hidden]:
            raise KaLMConfigError(
                f"Passage {record.id!r} window {record.window}: states "
                f"{str(states.dtype).removeprefix('torch.')} {list(states.shape)} "
                f"where the store holds {identity.dtype} [{record.rows}, {hidden}]."
            )
        rows[record.id, record.window] = (record, states)
    columns: dict[str, list[Any]] = {name: [] for name in PASSAGE_SCHEMA.names}
    for record, states in rows.values():
        for name in _RECORD:
            columns[name].append(getattr(record, name))
        columns["states"].append(states.reshape(-1).view(torch.uint8).numpy().tobytes())
        columns["states_crc32"].append(states_crc32(record, states))
        columns["run_id"].append(run_id)
        columns["written_at"].append(int(written_at))
    return pa.table(columns, schema=schema)


def read_metadata(schema: pa.Schema, name: str) -> tuple[StoreIdentity, int]:
    """``(identity, hidden size)`` from a store's schema; ``KaLMConfigError``
    when it is not a passage store of this format."""
    meta = schema.metadata or {}
    if _IDENTITY not in meta or _FORMAT not in meta:
        raise KaLMConfigError(f"{name} is not a passage store (no identity recorded).")
    found = meta[_FORMAT].decode(errors="replace")
    if found != LANCE_STORE_FORMAT:
        raise KaLMConfigError(
            f"Passage store {name} has store format {found!r}; this version reads "
            f"{LANCE_STORE_FORMAT!r} only: upgrade the plugin, or re-encode the "
            f"corpus with kalm-vllm-encode into a new store."
        )
    if schema.remove_metadata() != PASSAGE_SCHEMA:
        raise KaLMConfigError(
            f"Passage store {name} does not have the passage columns."
        )
    try:
        identity = StoreIdentity(**json.loads(meta[_IDENTITY]))
        hidden = int(meta[_HIDDEN])
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptStoreError(
            f"Passage store {name}: the identity in its schema metadata is damaged "
            f"({error}).",
            file="schema metadata",
        ) from None
    return identity, hidden


def decode_states(
    record: PassageRecord,
    data: pa.Buffer,
    checksum: int,
    identity: StoreIdentity,
    hidden: int,
) -> tuple[Any, str | None]:
    """``(states [rows, hidden], None)``, or ``(None, what is wrong)``."""
    import numpy as np
    import torch

    dtype = getattr(torch, identity.dtype)
    size = record.rows * hidden * dtype.itemsize
    if data.size != size:
        return (
            None,
            f"hold {data.size} bytes where [{record.rows}, {hidden}] need {size}",
        )
    raw = torch.from_numpy(np.frombuffer(data, np.uint8).copy())
    states = raw.view(dtype).reshape(record.rows, hidden)
    if states_crc32(record, states) != checksum:
        return None, "fail their checksum"
    return states, None


def store_name(uri: str) -> str:
    """The store's last path component: messages name no machine path."""
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def open_dataset(uri: str, options: Mapping[str, str]) -> Any | None:
    """The dataset at ``uri``, or ``None`` when there is none."""
    import lance

    try:
        return lance.dataset(uri, storage_options=dict(options))
    except ValueError as error:
        if "was not found" in str(error):
            return None
        raise


def quote(text: str) -> str:
    """A Lance SQL string literal (quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"


def in_filter(ids: Sequence[str]) -> str:
    """``id IN (...)`` as Lance SQL."""
    return f"id IN ({','.join(quote(i) for i in ids)})"


def newest(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each id's newest rows (greatest ``written_at``, then ``run_id``), in
    window order; older rows are left out."""
    best: dict[str, tuple[int, str]] = {}
    kept: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["written_at"], row["run_id"])
        current = best.get(row["id"])
        if current is None or key > current:
            best[row["id"]], kept[row["id"]] = key, [row]
        elif key == current:
            kept[row["id"]].append(row)
    for group in kept.values():
        group.sort(key=lambda r: r["window"])
    return kept


def to_record(row: dict[str, Any]) -> PassageRecord:
    return PassageRecord(
        row["id"],
        row["text_sha256"],
        row["rows"],
        row["num_tokens"],
        row["truncated"],
        row["passage_key"],
        window=row["window"],
        windows=row["windows"],
        token_start=row["token_start"],
        token_end=row["token_end"],
    )


def scan_rows(
    dataset: Any, columns: list[str], filter: str | None, *, states: bool = False
) -> Iterator[dict[str, Any]]:
    """Rows as dicts; with ``states``, also ``"states"`` (a buffer, no copy),
    ``"states_crc32"`` and ``"fragment"`` (the Lance fragment holding it)."""
    if states:
        columns = [*columns, "states", "states_crc32"]
    for batch in dataset.to_batches(
        columns=columns, filter=filter, with_row_address=states
    ):
        plain = batch.drop_columns(["states"]) if states else batch
        for i, row in enumerate(plain.to_pylist()):
            if states:
                row["states"] = batch.column("states")[i].as_buffer()
                row["fragment"] = row.pop("_rowaddr") >> 32
            yield row


def _id_index(dataset: Any) -> str | None:
    """The name of the scalar index on ``id``, if there is one."""
    for index in dataset.describe_indices():
        if list(index.field_names) == ["id"]:
            return str(index.name)
    return None


def unindexed_fragments(dataset: Any) -> int:
    """Fragments that lookups scan because the ``id`` index lacks them."""
    name = _id_index(dataset)
    if name is None:
        return len(dataset.get_fragments())
    return int(dataset.stats.index_stats(name)["num_unindexed_fragments"])


class LanceStore:
    """Read pooled passage states by document id from a Lance dataset.

    The same methods and errors as ``PassageStore``; ``version`` is the
    dataset version read, ``refresh`` moves to the latest one.

    Args:
        uri: a local path or an object store URI (``s3://bucket/store.lance``).
        expected: refuse the store unless it was built with these settings
            (an engine pooling coarser than the store is accepted).
        storage_options: passed to Lance (endpoint, credentials, region).

    Example:
        >>> store = LanceStore("s3://bucket/store.lance", storage_options=opts)
        >>> store.records(["doc-1"])[0].rows, store.version
        (5, 3)
    """

    def __init__(
        self,
        uri: str | os.PathLike[str],
        expected: StoreIdentity | None = None,
        *,
        storage_options: Mapping[str, str] | None = None,
    ) -> None:
        self.uri = os.fspath(uri)
        self.name = store_name(self.uri)
        self._dataset = open_dataset(self.uri, storage_options or {})
        if self._dataset is None:
            raise KaLMConfigError(f"No passage store at {self.uri} (no Lance dataset).")
        self.identity, self.hidden_size = read_metadata(self._dataset.schema, self.uri)
        _check(self.identity, expected, self.uri, coarser_reader=True)

    @property
    def version(self) -> int:
        return int(self._dataset.version)

    def refresh(self) -> bool:
        """Check out the latest version; ``True`` when it moved."""
        before = self.version
        self._dataset.checkout_latest()
        if self.version != before:
            identity, hidden = read_metadata(self._dataset.schema, self.uri)
            if (identity, hidden) != (self.identity, self.hidden_size):
                raise KaLMConfigError(
                    f"Passage store {self.uri} changed its identity at version "
                    f"{self.version}; reopen it."
                )
        return self.version != before

    def __len__(self) -> int:
        """Documents stored (a document stored as windows counts once)."""
        return len(self.ids())

    def ids(self) -> list[str]:
        """Every stored document id, in id order."""
        table = self._dataset.to_table(columns=["id"], filter="window = 0")
        return sorted(set(table.column("id").to_pylist()))

    def records(self, ids: Sequence[str]) -> list[PassageRecord]:
        """Records in the order of ``ids``; ``UnknownDocumentError`` names the
        unknown ones."""
        found = self._rows(ids, states=False)
        return [to_record(found[i][0]) for i in ids]

    def window_records(self, ids: Sequence[str]) -> dict[str, list[PassageRecord]]:
        """Each document's records, window by window."""
        found = self._rows(ids, states=False)
        return {i: [to_record(r) for r in found[i]] for i in dict.fromkeys(ids)}

    def get(self, ids: Sequence[str]) -> list[Any]:
        """Pooled states ``[rows, hidden]`` in the order of ``ids``, each verified
        against its checksum (``CorruptStoreError`` naming the id and fragment)."""
        return [states for _, states in self.load(ids)]

    def load(self, ids: Sequence[str]) -> list[tuple[PassageRecord, Any]]:
        """``(record, states)`` of each id's first window, from one version."""
        return self.load_windows([(i, 0) for i in ids])

    def load_windows(
        self, keys: Sequence[tuple[str, int]]
    ) -> list[tuple[PassageRecord, Any]]:
        """``(record, states)`` of ``(id, window)`` keys, in order, verified."""
        found = self._rows([i for i, _ in keys], states=True)
        rows = {(r["id"], r["window"]): r for group in found.values() for r in group}
        missing = [k for k in keys if k not in rows]
        if missing:
            raise UnknownDocumentError(
                f"Passage store {self.name} holds no window {missing[0][1]} of "
                f"document {missing[0][0]!r}.",
                [i for i, _ in missing],
            )
        loaded: dict[tuple[str, int], tuple[PassageRecord, Any]] = {}
        for key in dict.fromkeys(keys):
            row = rows[key]
            record = to_record(row)
            states, problem = decode_states(
                record,
                row["states"],
                row["states_crc32"],
                self.identity,
                self.hidden_size,
            )
            if problem is not None:
                raise self._corrupt(record.id, row["fragment"], problem)
            loaded[key] = (record, states)
        return [loaded[k] for k in keys]

    def close(self) -> None:
        """Nothing is held open but the dataset handle; idempotent."""

    def __enter__(self) -> LanceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(
        self, ids: Sequence[str], *, states: bool
    ) -> dict[str, list[dict[str, Any]]]:
        """Each id's newest rows, from one version; unknown ids raise."""
        unique = list(dict.fromkeys(ids))
        found: dict[str, list[dict[str, Any]]] = {}
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            rows = scan_rows(
                self._dataset, [*_RECORD, *_VERSION], in_filter(chunk), states=states
            )
            found.update(newest(rows))
        missing = [i for i in unique if i not in found]
        if missing:
            shown = ", ".join(repr(i) for i in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise UnknownDocumentError(
                f"Unknown document id(s) in passage store {self.name}: {shown}{more}.",
                missing,
            )
        return found

    def _corrupt(
        self, passage_id: str, fragment: int, problem: str
    ) -> CorruptStoreError:
        return CorruptStoreError(
            f"Passage {passage_id!r} in passage store {self.name}: its states in "
            f"Lance fragment {fragment} {problem}. Run kalm-vllm-store verify on "
            f"the store to list every damaged passage, and rebuild it with "
            f"kalm-vllm-encode into a new store.",
            passage_id=passage_id,
            file=f"fragment {fragment}",
        )


class LanceStoreWriter:
    """A writer of a Lance passage store; creates it on its first write, or
    appends to it if its settings match. Any number may write at once.

    Example:
        >>> with LanceStoreWriter("s3://bucket/store.lance", identity) as w:
        ...     w.write([(record, states)])
        1
    """

    def __init__(
        self,
        uri: str | os.PathLike[str],
        identity: StoreIdentity,
        *,
        storage_options: Mapping[str, str] | None = None,
    ) -> None:
        self.uri = os.fspath(uri)
        self.identity = identity
        self._options = dict(storage_options or {})
        self._dataset = open_dataset(self.uri, self._options)
        self.hidden_size: int | None = None
        if self._dataset is not None:
            self._adopt(self._dataset)
        self._last_written_at = 0

    def text_hashes(self) -> dict[str, tuple[str, int, bool]]:
        """``id -> (text sha256, windows, truncated)`` of each document's
        newest rows (for incremental runs; truncated: of its first window)."""
        if self._dataset is None:
            return {}
        self._dataset.checkout_latest()
        columns = ["id", "window", "text_sha256", "windows", "truncated", *_VERSION]
        rows = scan_rows(self._dataset, columns, "window = 0")
        return {
            i: (g[0]["text_sha256"], g[0]["windows"], g[0]["truncated"])
            for i, g in newest(rows).items()
        }

    def write(self, items: Iterable[tuple[PassageRecord, Any]]) -> int:
        """Append a batch (every window of its documents) as one commit, then
        delete the older rows of its ids as a second; returns how many."""
        import lance

        batch = list(items)
        if not batch:
            return 0
        if self._dataset is None:
            self._create(int(batch[0][1].shape[-1]))
        assert self.hidden_size is not None
        # Later than anything this writer wrote, even if the clock stepped back.
        written_at = max(time.time_ns(), self._last_written_at + 1)
        self._last_written_at = written_at
        table = passage_table(
            batch,
            run_id=uuid.uuid4().hex,
            written_at=written_at,
            schema=schema_for(self.identity, self.hidden_size),
        )
        self._dataset = lance.write_dataset(
            table, self.uri, mode="append", storage_options=self._options
        )
        self.supersede([r.id for r, _ in batch], written_at)
        return len(batch)

    def supersede(self, ids: Sequence[str], written_at: int) -> int:
        """Delete the rows of ``ids`` written strictly before ``written_at``;
        returns how many (no commit when there are none)."""
        if self._dataset is None:
            return 0
        self._dataset.checkout_latest()  # the batch may have been committed elsewhere
        unique = list(dict.fromkeys(ids))
        deleted = 0
        for start in range(0, len(unique), _CHUNK):
            predicate = (
                f"{in_filter(unique[start : start + _CHUNK])} "
                f"AND written_at < {int(written_at)}"
            )
            if self._dataset.count_rows(predicate):
                deleted += int(self._dataset.delete(predicate)["num_deleted_rows"])
        return deleted

    def compact(self, *, older_than: timedelta = timedelta(hours=1)) -> dict[str, int]:
        """Delete superseded rows, rewrite small fragments, rebuild the index on
        ``id`` and remove versions older than ``older_than``; returns counts."""
        if self._dataset is None:
            return {"superseded": 0, "fragments": 0, "versions_removed": 0}
        dataset = self._dataset
        dataset.checkout_latest()
        rows = list(scan_rows(dataset, ["id", "window", *_VERSION], None))
        keep = {
            (r["id"], r["written_at"], r["run_id"])
            for g in newest(rows).values()
            for r in g
        }
        stale = sorted({(r["id"], r["written_at"], r["run_id"]) for r in rows} - keep)
        superseded = 0
        for start in range(0, len(stale), 200):
            predicate = " OR ".join(
                f"(id = {quote(i)} AND written_at = {w} AND run_id = {quote(r)})"
                for i, w, r in stale[start : start + 200]
            )
            superseded += int(dataset.delete(predicate)["num_deleted_rows"])
        dataset.optimize.compact_files()
        if _id_index(dataset) is None:
            dataset.create_scalar_index("id", "BTREE")
        else:
            dataset.optimize.optimize_indices()
        cleanup = dataset.cleanup_old_versions(older_than=older_than)
        return {
            "superseded": superseded,
            "fragments": len(dataset.get_fragments()),
            "versions_removed": int(cleanup.old_versions),
        }

    def close(self) -> None:
        """Every write is committed when it returns; idempotent."""

    def __enter__(self) -> LanceStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _adopt(self, dataset: Any) -> None:
        identity, self.hidden_size = read_metadata(dataset.schema, self.uri)
        _check(identity, self.identity, self.uri)

    def ensure_created(self, hidden: int) -> None:
        """Create the (empty) dataset with its index for states of ``hidden``
        values per row, unless it exists: a writer whose workers write
        fragments (``ray_encode.py``) needs the schema before the first row."""
        if self._dataset is None:
            self._create(hidden)

    def _create(self, hidden: int) -> None:
        """Create the dataset and its index, or join a writer that just did."""
        import lance

        schema = schema_for(self.identity, hidden)
        try:
            # No retry: on a conflict Lance would rebase a create into an
            # overwrite of the other creator's rows (seen on S3).
            dataset = lance.LanceDataset.commit(
                self.uri,
                lance.LanceOperation.Overwrite(schema, []),
                read_version=0,
                max_retries=0,
                storage_options=self._options,
                enable_v2_manifest_paths=True,
            )
        except OSError:
            dataset = open_dataset(self.uri, self._options)
            if dataset is None:
                raise
        else:
            dataset.create_scalar_index("id", "BTREE")
        self._adopt(dataset)
        self._dataset = dataset
