# SPDX-License-Identifier: Apache-2.0
"""The passage store: pooled encoder states of a corpus, keyed by document id.

Layout of a store directory::

    index.sqlite     meta (what produced the store, how many passages) and
                     one row per passage: id, text sha256, shard file, tensor
                     name, rows, tokens, CRC-32 of the passage; one row per
                     shard: its size and sha256
    index.sqlite.creating  only while the first writer builds the index
    shards/*.safetensors   the pooled states [ceil(L/N), hidden], model dtype
    writer.lock      held (flock) by the one process allowed to write

Why this format: safetensors is the checkpoint format vLLM and Transformers
already read (zero-copy, memory-mapped, no pickle), and SQLite gives atomic,
durable commits and concurrent readers with no server. A write is "shard file
first (written to a temp name, fsynced, renamed), then one SQLite transaction
that points the ids at it": a process killed at any moment leaves every
committed passage readable, and at worst an orphan shard that the next writer
deletes. The index itself is created complete (schema and identity) under a
temporary name and renamed into place, so a reader finds either no store or a
whole one; a leftover temporary name reads as "being created". On shared or
object storage several serving replicas can read the same store: shards are
immutable once written, so they can be synced to object storage and served
from a local cache, with ``index.sqlite`` shipped as a versioned snapshot (or
moved to a shared database) when writes happen.

Integrity (part of the reader contract: a later format must keep it). Every
passage row carries a CRC-32 of its record and of the exact dtype, shape and
bytes of its states, and every shard row the size and sha256 of the file,
all written in the transaction that publishes them. What is checked when:

- opening (reader or writer): the format version, SQLite's ``quick_check``
  (reads every page of the index: 4 ms for 10k passages, 50 ms for 100k) and
  the row count against the count kept in meta, so a damaged index is refused
  at once rather than answering "unknown id" for some passages. A writer runs
  the full ``integrity_check`` instead (below), as it deletes the shards the
  index says nothing points at;
- reading states (``get``, ``load``): the passage's CRC-32 (4 GB/s on one
  core, 0.3 ms for a 1.3 MB passage; sha256 is 2.3x and blake2b 4.5x slower),
  a shard's size when it is first opened, and that every row read back is one
  that was asked for. A failure, or an SQLite error while reading, is a
  ``CorruptStoreError`` naming the passage id and the file;
- ``kalm-vllm-store verify`` (``store.verify``): SQLite's full
  ``integrity_check`` (also each index against the table: 2.5x the cost of
  ``quick_check`` and growing faster) and, only there, every shard's sha256
  and every passage's states against its checksum.

CRC-32 guards against damage, not against someone who can rewrite the index.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from kalm_t5gemma2_vllm_plugin.checkpoints.hub import model_fingerprint
from kalm_t5gemma2_vllm_plugin.constants import TEMPLATE_VERSION
from kalm_t5gemma2_vllm_plugin.errors import (
    CorruptStoreError,
    KaLMConfigError,
    UnknownDocumentError,
)

__all__ = [
    "FORMAT_VERSION",
    "PassageRecord",
    "PassageStore",
    "PassageStoreWriter",
    "StoreIdentity",
    "states_crc32",
    "text_sha256",
]

#: 2: rows carry the passage key (shared with the engine's caches).
#: 3: checksums of every passage and shard, and the passage count in meta.
#: 4: a document may be stored as its windows (``windows.py``): rows keyed by
#:    (id, window), with the window's span in the document's tokens.
FORMAT_VERSION = 4
_INDEX, _LOCK, _SHARDS = "index.sqlite", "writer.lock", "shards"
_CREATING = _INDEX + ".creating"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS passages (
    id TEXT NOT NULL,
    text_sha256 TEXT NOT NULL,
    shard TEXT NOT NULL,
    tensor TEXT NOT NULL,
    rows INTEGER NOT NULL,
    num_tokens INTEGER NOT NULL,
    truncated INTEGER NOT NULL,
    passage_key TEXT NOT NULL,
    states_crc32 INTEGER NOT NULL,
    window INTEGER NOT NULL,
    windows INTEGER NOT NULL,
    token_start INTEGER NOT NULL,
    token_end INTEGER NOT NULL,
    PRIMARY KEY (id, window)
);
CREATE INDEX IF NOT EXISTS passages_by_shard ON passages (shard);
CREATE TABLE IF NOT EXISTS shards (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
"""
_COLUMNS = (
    "id, text_sha256, shard, tensor, rows, num_tokens, truncated, passage_key, "
    "states_crc32, window, windows, token_start, token_end"
)


@dataclass(frozen=True)
class StoreIdentity:
    """What produced a store; a reader with any other value is refused."""

    model_fingerprint: str
    encoder_chunk_size: int | None
    document_max_length: int
    template_version: str
    dtype: str
    format_version: int = FORMAT_VERSION

    def mismatches(
        self, other: StoreIdentity, *, coarser_reader: bool = False
    ) -> list[str]:
        """What differs from ``other``. ``coarser_reader``: ``other`` is an
        engine that may pool coarser than the store (its chunk size a
        multiple of the store's: stored states are re-pooled exactly)."""
        problems = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "encoder_chunk_size" and coarser_reader:
                if (theirs or 1) % (mine or 1):
                    problems.append(
                        f"encoder_chunk_size={mine!r} (store) vs {theirs!r} (here): "
                        f"an engine may read a store encoded at a finer chunk size "
                        f"whose multiple it is (states are re-pooled), not this one"
                    )
            elif mine != theirs:
                problems.append(f"{f.name}={mine!r} (store) vs {theirs!r} (here)")
        return problems

    @classmethod
    def for_engine(
        cls,
        model_path: str,
        chunk_size: int | None,
        document_max_length: int,
        dtype: str,
    ) -> StoreIdentity:
        return cls(
            model_fingerprint(model_path),
            chunk_size,
            document_max_length,
            TEMPLATE_VERSION,
            dtype,
        )


@dataclass(frozen=True)
class PassageRecord:
    """One stored passage: a whole document, or one window of one."""

    id: str
    #: sha256 of the document's whole text (every window carries it).
    text_sha256: str
    rows: int
    #: Encoder tokens the states were pooled from (prefix included).
    num_tokens: int
    truncated: bool
    #: ``passage_key.passage_key`` of the encoder ids the states came from.
    passage_key: str
    #: Which window of the document this is, of how many, and its span in the
    #: document's own tokens (a whole document: window 0 of 1, span (0, 0)).
    window: int = 0
    windows: int = 1
    token_start: int = 0
    token_end: int = 0


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def states_crc32(record: PassageRecord, states: Any) -> int:
    """CRC-32 of a passage's record and its states' dtype, shape and bytes.

    The record is included so that a row pointing at another passage's tensor
    (a swapped shard, a damaged tensor name) fails as surely as a flipped byte.
    """
    import torch

    head = json.dumps(
        [
            record.id,
            record.text_sha256,
            int(record.rows),
            int(record.num_tokens),
            bool(record.truncated),
            record.passage_key,
            int(record.window),
            int(record.windows),
            int(record.token_start),
            int(record.token_end),
            str(states.dtype),
            list(states.shape),
        ]
    )
    data = states.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(data, zlib.crc32(head.encode()))


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def _unreadable(root: Path, error: sqlite3.DatabaseError) -> CorruptStoreError:
    return CorruptStoreError(
        f"Passage store {root.name}: {_INDEX} is not a readable passage store "
        f"index ({error}).",
        file=_INDEX,
    )


def _read_identity(db: sqlite3.Connection, root: Path) -> StoreIdentity:
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if "identity" not in meta:
        raise KaLMConfigError(f"{root} is not a passage store (no identity recorded).")
    try:
        identity = json.loads(meta["identity"])
        version = identity.get("format_version")
    except (ValueError, AttributeError) as error:
        raise CorruptStoreError(
            f"Passage store {root.name}: the identity in {_INDEX} is damaged "
            f"({error}).",
            file=_INDEX,
        ) from None
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        remedy = (
            "It was written by a newer version of this plugin: upgrade the plugin."
            if newer
            else "Re-encode the corpus with kalm-vllm-encode into a new store "
            "directory (or delete this one first); format 3 adds the checksums "
            "every read is verified against."
        )
        raise KaLMConfigError(
            f"Passage store {root} has format version {version}; this version "
            f"reads format {FORMAT_VERSION} only. {remedy}"
        )
    return StoreIdentity(**identity)


def _check_index(db: sqlite3.Connection, root: Path, *, full: bool = False) -> None:
    """The checks cheap enough for every open (see the module docstring);
    ``full``: SQLite's ``integrity_check`` instead of ``quick_check``."""
    fix = "Rebuild the store with kalm-vllm-encode into a new directory."
    check = "integrity_check" if full else "quick_check"
    problems = [" ".join(str(p).split()) for (p,) in db.execute(f"PRAGMA {check}(5)")]
    if problems != ["ok"]:
        raise CorruptStoreError(
            f"Passage store {root.name}: {_INDEX} is damaged (SQLite {check}: "
            f"{'; '.join(problems)}). {fix}",
            file=_INDEX,
        )
    if (problem := _count_problem(db)) is not None:
        raise CorruptStoreError(
            f"Passage store {root.name}: {_INDEX} {problem}: rows were lost or the "
            f"index is damaged. {fix}",
            file=_INDEX,
        )


def _count_problem(db: sqlite3.Connection) -> str | None:
    """What is wrong with the passage count kept in meta, if anything."""
    # One statement, so a writer committing meanwhile cannot skew the two.
    counted, recorded = db.execute(
        "SELECT (SELECT COUNT(*) FROM passages), "
        "(SELECT value FROM meta WHERE key = 'passages')"
    ).fetchone()
    if str(recorded).isdigit() and int(recorded) == counted:
        return None
    return f"holds {counted} passage rows but recorded {recorded}"


def _check(
    stored: StoreIdentity,
    expected: StoreIdentity | None,
    root: str | os.PathLike[str],
    *,
    coarser_reader: bool = False,
) -> None:
    if expected is not None and (
        problems := stored.mismatches(expected, coarser_reader=coarser_reader)
    ):
        raise KaLMConfigError(
            f"Passage store {root} was built with other settings: "
            f"{'; '.join(problems)}. Rebuild it with kalm-vllm-encode or use "
            f"matching settings."
        )


class PassageStore:
    """Read pooled passage states by document id.

    Args:
        path: the store directory.
        expected: refuse the store unless it was built with these settings;
            the reader's chunk size may be a multiple of the store's (the
            engine re-pools the stored states).
    """

    def __init__(
        self, path: str | os.PathLike[str], expected: StoreIdentity | None = None
    ) -> None:
        self.root = Path(path)
        if not (self.root / _INDEX).is_file():
            if (self.root / _CREATING).exists():
                raise KaLMConfigError(
                    f"Passage store {self.root} is being created and is not ready "
                    f"yet. If no kalm-vllm-encode is writing it, its creation was "
                    f"interrupted: run kalm-vllm-encode again."
                )
            raise KaLMConfigError(f"No passage store at {self.root} (no {_INDEX}).")
        try:
            self._db = _connect(self.root / _INDEX)
        except sqlite3.DatabaseError as error:
            raise _unreadable(self.root, error) from error
        try:
            self.identity = _read_identity(self._db, self.root)
            _check_index(self._db, self.root)
            _check(self.identity, expected, self.root, coarser_reader=True)
        except BaseException as error:
            self._db.close()
            if isinstance(error, sqlite3.DatabaseError):
                raise _unreadable(self.root, error) from error
            raise
        self._shards: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        """Documents stored (a document stored as windows counts once)."""
        return int(
            self._db.execute(
                "SELECT COUNT(*) FROM passages WHERE window = 0"
            ).fetchone()[0]
        )

    def ids(self) -> list[str]:
        """Every stored document id, in id order."""
        query = "SELECT id FROM passages WHERE window = 0 ORDER BY id"
        return [i for (i,) in self._db.execute(query)]

    def refresh(self) -> bool:
        """Nothing to do: SQLite shows every committed write to the next read
        (``LanceStore.refresh`` checks out a newer version)."""
        return False

    def window_records(self, ids: Sequence[str]) -> dict[str, list[PassageRecord]]:
        """Each document's records, window by window (one for a document
        stored whole); ``UnknownDocumentError`` names unknown ids."""
        self._rows(ids)  # unknown ids, as every lookup reports them
        found: dict[str, list[PassageRecord]] = {i: [] for i in ids}
        for _, record in self._windows(list(found)):
            found[record.id].append(record)
        return found

    def load_windows(
        self, keys: Sequence[tuple[str, int]]
    ) -> list[tuple[PassageRecord, Any]]:
        """``(record, states)`` of ``(id, window)`` keys, in order, verified
        as ``get`` does."""
        ids = list(dict.fromkeys(i for i, _ in keys))
        rows = {(r.id, r.window): (r, row) for row, r in self._windows(ids)}
        missing = [k for k in keys if k not in rows]
        if missing:
            self._rows([i for i, _ in missing])  # unknown ids, named as usual
            raise UnknownDocumentError(
                f"Passage store {self.root.name} holds no window "
                f"{missing[0][1]} of document {missing[0][0]!r}.",
                [i for i, _ in missing],
            )
        return [(rows[k][0], self._states(rows[k][0], rows[k][1])) for k in keys]

    def _windows(
        self, ids: list[str]
    ) -> Iterable[tuple[tuple[Any, ...], PassageRecord]]:
        for start in range(0, len(ids), 500):  # SQLite's host-parameter limit
            chunk = ids[start : start + 500]
            query = (
                f"SELECT {_COLUMNS} FROM passages WHERE id IN "
                f"({','.join('?' * len(chunk))}) ORDER BY id, window"
            )
            try:
                rows = self._db.execute(query, chunk).fetchall()
            except sqlite3.DatabaseError as error:
                raise self._corrupt_index(
                    chunk[0], f"cannot be read ({error})"
                ) from None
            asked = set(chunk)
            for row in rows:
                if row[0] not in asked:
                    raise self._corrupt_index(
                        row[0], f"holds id {row[0]!r} under another id's key"
                    )
                yield row[1:], self._record(row[0], row[1:])

    def records(self, ids: Sequence[str]) -> list[PassageRecord]:
        """Records in the order of ``ids``; ``UnknownDocumentError`` (a
        ``KeyError``) names the unknown ones."""
        rows = self._rows(ids)
        return [self._record(i, rows[i]) for i in ids]

    def get(self, ids: Sequence[str]) -> list[Any]:
        """Pooled states ``[rows, hidden]`` in the order of ``ids``, each verified
        against its checksum (``CorruptStoreError`` naming the id and shard)."""
        return [states for _, states in self.load(ids)]

    def load(self, ids: Sequence[str]) -> list[tuple[PassageRecord, Any]]:
        """``(record, states)`` in the order of ``ids``, from one index read (so a
        record always describes the states beside it, even during a rewrite),
        each verified as ``get`` does."""
        rows = self._rows(ids)
        loaded = []
        for i in ids:
            record = self._record(i, rows[i])
            loaded.append((record, self._states(record, rows[i])))
        return loaded

    def close(self) -> None:
        self._shards.clear()
        self._db.close()

    def _rows(self, ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        unique = list(dict.fromkeys(ids))
        found: dict[str, tuple[Any, ...]] = {}
        for start in range(0, len(unique), 500):  # SQLite's host-parameter limit
            chunk = unique[start : start + 500]
            asked = set(chunk)
            for row in self._lookup(chunk):
                if row[0] not in asked:
                    raise self._corrupt_index(
                        row[0], f"holds id {row[0]!r} under another id's key"
                    )
                found[row[0]] = row[1:]
        missing = [i for i in unique if i not in found]
        if missing:
            shown = ", ".join(repr(i) for i in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise UnknownDocumentError(
                f"Unknown document id(s) in passage store {self.root.name}: "
                f"{shown}{more}.",
                missing,
            )
        return found

    def _lookup(self, ids: list[str]) -> list[tuple[Any, ...]]:
        marks = ",".join("?" * len(ids))
        query = f"SELECT {_COLUMNS} FROM passages WHERE window = 0 AND id IN ({marks})"
        try:
            return self._db.execute(query, ids).fetchall()
        except sqlite3.DatabaseError as error:
            # Name the passage whose row is damaged, not just the batch's first.
            if len(ids) > 1:
                for one in ids:
                    self._lookup([one])
            raise self._corrupt_index(ids[0], f"cannot be read ({error})") from None

    def _corrupt_index(self, passage_id: str, problem: str) -> CorruptStoreError:
        return CorruptStoreError(
            f"Passage {passage_id!r} in passage store {self.root.name}: its row in "
            f"{_INDEX} {problem}. Run kalm-vllm-store verify on the store, and "
            f"rebuild it with kalm-vllm-encode into a new directory.",
            passage_id=passage_id,
            file=_INDEX,
        )

    @staticmethod
    def _record(passage_id: str, row: tuple[Any, ...]) -> PassageRecord:
        return PassageRecord(
            passage_id,
            row[0],
            row[3],
            row[4],
            bool(row[5]),
            row[6],
            window=row[8],
            windows=row[9],
            token_start=row[10],
            token_end=row[11],
        )

    def _states(self, record: PassageRecord, row: tuple[Any, ...]) -> Any:
        from safetensors import SafetensorError

        shard, tensor, checksum = row[1], row[2], row[7]
        try:
            states = self._shard(shard, record.id).get_tensor(tensor)
        except SafetensorError as error:
            raise self._corrupt(record.id, shard, f"cannot be read ({error})") from None
        try:
            sound = states_crc32(record, states) == checksum
        except (TypeError, ValueError):  # a damaged row's values
            sound = False
        if not sound:
            raise self._corrupt(record.id, shard, "fail their checksum")
        return states

    def _shard(self, name: str, passage_id: str) -> Any:
        if name not in self._shards:
            self._shards[name] = self._open_shard(name, passage_id)
            if len(self._shards) > 64:
                self._shards.popitem(last=False)
        self._shards.move_to_end(name)
        return self._shards[name]

    def _open_shard(self, name: str, passage_id: str) -> Any:
        """Open a shard after checking its size against the index (a stat: the
        sha256 of the whole file is for ``verify``)."""
        from safetensors import SafetensorError, safe_open

        listed = self._db.execute(
            "SELECT size FROM shards WHERE name = ?", (name,)
        ).fetchone()
        if listed is None:
            problem = "cannot be read: the file is not listed in the index"
            raise self._corrupt(passage_id, name, problem)
        path = self.root / _SHARDS / name
        try:
            size = path.stat().st_size
            if size != listed[0]:
                problem = (
                    f"cannot be read: the file has {size} bytes, the index says "
                    f"{listed[0]}"
                )
                raise self._corrupt(passage_id, name, problem)
            return safe_open(path, framework="pt")
        except OSError as error:
            problem = f"cannot be read ({error.strerror})"
            raise self._corrupt(passage_id, name, problem) from None
        except SafetensorError as error:
            raise self._corrupt(passage_id, name, f"cannot be read ({error})") from None

    def _corrupt(self, passage_id: str, shard: str, problem: str) -> CorruptStoreError:
        # Names only (the store, the shard): this message reaches HTTP clients.
        problem = problem.replace(str(self.root / _SHARDS) + os.sep, "")
        return CorruptStoreError(
            f"Passage {passage_id!r} in passage store {self.root.name}: its states "
            f"in shard file {shard} {problem}. Run kalm-vllm-store verify on the "
            f"store to list every damaged passage, and rebuild it with "
            f"kalm-vllm-encode into a new directory.",
            passage_id=passage_id,
            file=shard,
        )


class PassageStoreWriter:
    """The one writer of a store: creates it, or reopens it if settings match.

    A second writer on the same store is refused while this one is open.
    """

    def __init__(self, path: str | os.PathLike[str], identity: StoreIdentity) -> None:
        self.root = Path(path)
        (self.root / _SHARDS).mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / _LOCK, "a+")  # noqa: SIM115 - held until close
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise KaLMConfigError(
                f"Another process is writing to passage store {self.root}."
            ) from None
        if not (self.root / _INDEX).exists():
            _create_index(self.root, identity)
        self._db = _connect(self.root / _INDEX)
        try:
            _check(_read_identity(self._db, self.root), identity, self.root)
            # Full check: orphan removal trusts the shard index to find live
            # shards, and the encoding run that follows dwarfs its cost.
            _check_index(self._db, self.root, full=True)
        except BaseException:
            self.close()
            raise
        self.identity = identity
        self._remove_orphans()

    def text_hashes(self) -> dict[str, tuple[str, int, bool]]:
        """``id -> (text sha256, windows, truncated)`` of every stored document
        (for incremental runs; truncated: of its first window)."""
        query = (
            "SELECT id, text_sha256, windows, truncated FROM passages WHERE window = 0"
        )
        return {i: (h, n, bool(t)) for i, h, n, t in self._db.execute(query)}

    def write(self, items: Iterable[tuple[PassageRecord, Any]]) -> int:
        """Store a batch of ``(record, states)`` durably; returns how many.

        The shard is complete on disk before the index points at it, and the
        index changes in one transaction: a crash keeps all or none of the batch.
        A document's rows are replaced whole: a batch holds all of its windows.
        """
        from safetensors.torch import save

        batch = list(items)
        if not batch:
            return 0
        tensors = {
            str(i): states.detach().to("cpu").contiguous()
            for i, (_, states) in enumerate(batch)
        }
        # Checksums of exactly what goes to disk, so nothing is read back.
        data = save(tensors)
        name = f"{uuid.uuid4().hex}.safetensors"
        final = self.root / _SHARDS / name
        temporary = final.with_suffix(".tmp")
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, final)
        _fsync_dir(final.parent)
        rows = [
            (
                r.id,
                r.text_sha256,
                name,
                str(i),
                r.rows,
                r.num_tokens,
                int(r.truncated),
                r.passage_key,
                states_crc32(r, tensors[str(i)]),
                r.window,
                r.windows,
                r.token_start,
                r.token_end,
            )
            for i, (r, _) in enumerate(batch)
        ]
        ids = list(dict.fromkeys(r.id for r, _ in batch))
        self._db.execute("BEGIN IMMEDIATE")
        try:
            # A key twice in one batch: the last one wins, counted once.
            keys = {(r.id, r.window) for r, _ in batch}
            added = len(keys) - self._remove_rows(ids)
            self._db.executemany(
                f"INSERT OR REPLACE INTO passages ({_COLUMNS}) VALUES "
                f"({', '.join('?' * len(rows[0]))})",
                rows,
            )
            self._db.execute(
                "INSERT INTO shards VALUES (?, ?, ?)",
                (name, len(data), hashlib.sha256(data).hexdigest()),
            )
            self._db.execute(
                "UPDATE meta SET value = CAST(value AS INTEGER) + ? "
                "WHERE key = 'passages'",
                (added,),
            )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # a failed COMMIT may have ended it
                self._db.execute("ROLLBACK")
            raise
        return len(batch)

    def _remove_rows(self, ids: list[str]) -> int:
        """Delete every row (all windows) of ``ids``; returns how many."""
        removed = 0
        for start in range(0, len(ids), 500):  # SQLite's host-parameter limit
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            removed += self._db.execute(
                f"DELETE FROM passages WHERE id IN ({marks})", chunk
            ).rowcount
        return int(removed)

    def close(self) -> None:
        self._db.close()
        self._lock.close()

    def __enter__(self) -> PassageStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _remove_orphans(self) -> None:
        """Delete shards no passage points at: from a crash before the commit,
        or whose passages were all re-encoded since. Done when a writer opens,
        not after each write, so readers that resolved an older row keep it."""
        live = {
            row[0] for row in self._db.execute("SELECT DISTINCT shard FROM passages")
        }
        # Rows first: a crash in between leaves only files, removed next time.
        self._db.execute(
            "DELETE FROM shards WHERE name NOT IN (SELECT shard FROM passages)"
        )
        for path in (self.root / _SHARDS).iterdir():
            if path.suffix == ".tmp" or path.name not in live:
                path.unlink(missing_ok=True)


def _create_index(root: Path, identity: StoreIdentity) -> None:
    """Build the whole index under a temporary name, then rename it into place.

    Called with the writer lock held. WAL mode is recorded in the file header,
    and closing the last connection folds the WAL back in, so the renamed file
    stands alone. A leftover from a killed creator is rebuilt from scratch.
    """
    creating = root / _CREATING
    for leftover in (creating, *(Path(f"{creating}{s}") for s in ("-wal", "-shm"))):
        leftover.unlink(missing_ok=True)
    db = _connect(creating)
    try:
        db.executescript(_SCHEMA)
        db.execute(
            "INSERT INTO meta VALUES ('identity', ?)", (json.dumps(asdict(identity)),)
        )
        db.execute("INSERT INTO meta VALUES ('passages', '0')")
    finally:
        db.close()
    with open(creating, "rb") as f:
        os.fsync(f.fileno())
    os.replace(creating, root / _INDEX)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
