# SPDX-License-Identifier: Apache-2.0
"""The passage store: pooled encoder states of a corpus, keyed by document id.

Layout of a store directory::

    index.sqlite     meta (what produced the store) and one row per passage:
                     id, text sha256, shard file, tensor name, rows, tokens
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
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from kalm_t5gemma2_vllm_plugin.checkpoints.hub import model_fingerprint
from kalm_t5gemma2_vllm_plugin.constants import TEMPLATE_VERSION
from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError, UnknownDocumentError

__all__ = [
    "FORMAT_VERSION",
    "PassageRecord",
    "PassageStore",
    "PassageStoreWriter",
    "StoreIdentity",
    "text_sha256",
]

#: 2: rows carry the passage key (shared with the engine's caches).
FORMAT_VERSION = 2
_INDEX, _LOCK, _SHARDS = "index.sqlite", "writer.lock", "shards"
_CREATING = _INDEX + ".creating"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS passages (
    id TEXT PRIMARY KEY,
    text_sha256 TEXT NOT NULL,
    shard TEXT NOT NULL,
    tensor TEXT NOT NULL,
    rows INTEGER NOT NULL,
    num_tokens INTEGER NOT NULL,
    truncated INTEGER NOT NULL,
    passage_key TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS passages_by_shard ON passages (shard);
"""


@dataclass(frozen=True)
class StoreIdentity:
    """What produced a store; a reader with any other value is refused."""

    model_fingerprint: str
    encoder_chunk_size: int | None
    document_max_length: int
    template_version: str
    dtype: str
    format_version: int = FORMAT_VERSION

    def mismatches(self, other: StoreIdentity) -> list[str]:
        return [
            f"{f.name}={getattr(self, f.name)!r} (store) vs "
            f"{getattr(other, f.name)!r} (here)"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

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
    id: str
    text_sha256: str
    rows: int
    num_tokens: int
    truncated: bool
    #: ``passage_key.passage_key`` of the encoder ids the states came from.
    passage_key: str


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def _read_identity(db: sqlite3.Connection, root: Path) -> StoreIdentity:
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if "identity" not in meta:
        raise KaLMConfigError(f"{root} is not a passage store (no identity recorded).")
    return StoreIdentity(**json.loads(meta["identity"]))


def _check(stored: StoreIdentity, expected: StoreIdentity | None, root: Path) -> None:
    if expected is not None and (problems := stored.mismatches(expected)):
        raise KaLMConfigError(
            f"Passage store {root} was built with other settings: "
            f"{'; '.join(problems)}. Rebuild it with kalm-vllm-encode or use "
            f"matching settings."
        )


class PassageStore:
    """Read pooled passage states by document id.

    Args:
        path: the store directory.
        expected: refuse the store unless it was built with exactly these settings.
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
            self.identity = _read_identity(self._db, self.root)
        except sqlite3.DatabaseError as error:
            raise KaLMConfigError(
                f"{self.root / _INDEX} is not a readable passage store index ({error})."
            ) from error
        _check(self.identity, expected, self.root)
        self._shards: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM passages").fetchone()[0])

    def ids(self) -> list[str]:
        """Every stored passage id, in id order."""
        return [i for (i,) in self._db.execute("SELECT id FROM passages ORDER BY id")]

    def records(self, ids: Sequence[str]) -> list[PassageRecord]:
        """Records in the order of ``ids``; ``UnknownDocumentError`` (a
        ``KeyError``) names the unknown ones."""
        rows = self._rows(ids)
        return [self._record(i, rows[i]) for i in ids]

    def get(self, ids: Sequence[str]) -> list[Any]:
        """Pooled states ``[rows, hidden]`` in the order of ``ids``."""
        rows = self._rows(ids)
        return [self._shard(rows[i][1]).get_tensor(rows[i][2]) for i in ids]

    def load(self, ids: Sequence[str]) -> list[tuple[PassageRecord, Any]]:
        """``(record, states)`` in the order of ``ids``, from one index read (so a
        record always describes the states beside it, even during a rewrite)."""
        rows = self._rows(ids)
        return [
            (self._record(i, rows[i]), self._shard(rows[i][1]).get_tensor(rows[i][2]))
            for i in ids
        ]

    def close(self) -> None:
        self._shards.clear()
        self._db.close()

    def _rows(self, ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        unique = list(dict.fromkeys(ids))
        found: dict[str, tuple[Any, ...]] = {}
        for start in range(0, len(unique), 500):  # SQLite's host-parameter limit
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(
                f"SELECT id, text_sha256, shard, tensor, rows, num_tokens, truncated, "
                f"passage_key "
                f"FROM passages WHERE id IN ({marks})",
                chunk,
            ):
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

    @staticmethod
    def _record(passage_id: str, row: tuple[Any, ...]) -> PassageRecord:
        return PassageRecord(passage_id, row[0], row[3], row[4], bool(row[5]), row[6])

    def _shard(self, name: str) -> Any:
        from safetensors import safe_open

        if name not in self._shards:
            self._shards[name] = safe_open(self.root / _SHARDS / name, framework="pt")
            if len(self._shards) > 64:
                self._shards.popitem(last=False)
        self._shards.move_to_end(name)
        return self._shards[name]


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
        _check(_read_identity(self._db, self.root), identity, self.root)
        self.identity = identity
        self._remove_orphans()

    def text_hashes(self) -> dict[str, str]:
        """``id -> text sha256`` of every stored passage (for incremental runs)."""
        return dict(self._db.execute("SELECT id, text_sha256 FROM passages"))

    def write(self, items: Iterable[tuple[PassageRecord, Any]]) -> int:
        """Store a batch of ``(record, states)`` durably; returns how many.

        The shard is complete on disk before the index points at it, and the
        index changes in one transaction: a crash keeps all or none of the batch.
        """
        from safetensors.torch import save_file

        batch = list(items)
        if not batch:
            return 0
        name = f"{uuid.uuid4().hex}.safetensors"
        final = self.root / _SHARDS / name
        temporary = final.with_suffix(".tmp")
        save_file(
            {str(i): states.contiguous() for i, (_, states) in enumerate(batch)},
            temporary,
        )
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, final)
        _fsync_dir(final.parent)
        self._db.execute("BEGIN IMMEDIATE")
        self._db.executemany(
            "INSERT OR REPLACE INTO passages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.id,
                    r.text_sha256,
                    name,
                    str(i),
                    r.rows,
                    r.num_tokens,
                    int(r.truncated),
                    r.passage_key,
                )
                for i, (r, _) in enumerate(batch)
            ],
        )
        self._db.execute("COMMIT")
        return len(batch)

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
