# SPDX-License-Identifier: Apache-2.0
"""Check a whole passage store, every byte of it (``kalm-vllm-store verify``).

What this adds to the checks every reader makes (``store.format``): SQLite's
full ``integrity_check``, each shard file's size and sha256, and every
passage's states read and checked against its CRC-32, with every problem
reported (a reader stops at the first). Files are named relative to the store.
A Lance store (``lance.py``) has no index or shard files to check: every row's
states against its CRC-32, each document's newest rows complete (windows 0 to
n-1), and as notes the superseded rows and fragments not in the ``id`` index
that ``kalm-vllm-store compact`` deals with. Problems name Lance fragments.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kalm_t5gemma2_vllm_plugin.errors import CorruptStoreError, KaLMConfigError
from kalm_t5gemma2_vllm_plugin.store.format import (
    _COLUMNS,
    _INDEX,
    _SHARDS,
    PassageRecord,
    _connect,
    _count_problem,
    _read_identity,
    states_crc32,
)

__all__ = ["StoreProblem", "VerifyReport", "verify_store"]

#: Python types of the ``_COLUMNS`` of a sound passage row.
_TYPES = [str, str, str, str, int, int, int, str, int, int, int, int, int]


@dataclass(frozen=True)
class StoreProblem:
    """One corrupt thing: ``file`` is a name inside the store."""

    file: str
    message: str
    passage_id: str | None = None


@dataclass
class VerifyReport:
    """What ``verify_store`` checked and found; ``notes`` are harmless
    leftovers (orphan shards) that the next writer removes."""

    store: str
    passages: int = 0
    #: Shard files (directory store) or fragments (Lance store) checked.
    shards: int = 0
    format: str = "directory"
    problems: list[StoreProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def corrupt_passages(self) -> list[str]:
        ids = (p.passage_id for p in self.problems if p.passage_id is not None)
        return list(dict.fromkeys(ids))

    def as_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "format": self.format,
            "ok": self.ok,
            "passages": self.passages,
            "shards": self.shards,
            "corrupt_passages": self.corrupt_passages,
            "problems": [asdict(p) for p in self.problems],
            "notes": self.notes,
        }


def verify_store(
    path: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, str] | None = None,
) -> VerifyReport:
    """Check the index, every shard and every passage of the store at ``path``
    (a Lance store: every row; ``storage_options`` as ``open_store``'s).

    Raises ``KaLMConfigError`` when there is no store there or its format is
    not this version's (nothing to verify against); corruption is reported,
    never raised.

    Example:
        >>> report = verify_store("./kalm-store")
        >>> report.ok, report.passages, report.corrupt_passages
        (False, 300, ['doc-17'])
    """
    from kalm_t5gemma2_vllm_plugin.store.uri import _options, is_lance_uri

    if is_lance_uri(path):
        return _verify_lance(os.fspath(path), _options(storage_options))
    root = Path(path)
    if not (root / _INDEX).is_file():
        raise KaLMConfigError(f"No passage store at {root} (no {_INDEX}).")
    report = VerifyReport(str(root))
    try:
        db = _connect(root / _INDEX)
    except sqlite3.DatabaseError as error:
        report.problems.append(StoreProblem(_INDEX, f"cannot be opened ({error})"))
        return report
    try:
        try:
            _read_identity(db, root)
        except sqlite3.DatabaseError as error:
            problem = f"has no readable meta ({error})"
            report.problems.append(StoreProblem(_INDEX, problem))
            return report
        except CorruptStoreError as error:
            report.problems.append(StoreProblem(_INDEX, str(error)))
            return report
        _check_index(db, report)
        listed = _listed_shards(db, report)
        _check_shards(root, listed, report)
        _check_passages(db, root, listed, report)
    finally:
        db.close()
    return report


def _check_index(db: sqlite3.Connection, report: VerifyReport) -> None:
    try:
        check = db.execute("PRAGMA integrity_check(100)")
        found = [" ".join(str(p).split()) for (p,) in check]  # one line each
        if found != ["ok"]:
            report.problems += [StoreProblem(_INDEX, f"SQLite: {p}") for p in found]
        if (problem := _count_problem(db)) is not None:
            report.problems.append(StoreProblem(_INDEX, problem))
    except sqlite3.DatabaseError as error:
        report.problems.append(StoreProblem(_INDEX, f"cannot be checked ({error})"))


def _listed_shards(db: sqlite3.Connection, report: VerifyReport) -> dict[str, Any]:
    try:
        rows = db.execute("SELECT name, size, sha256 FROM shards").fetchall()
    except sqlite3.DatabaseError as error:
        report.problems.append(
            StoreProblem(_INDEX, f"its shard list cannot be read ({error})")
        )
        return {}
    return {name: (size, sha256) for name, size, sha256 in rows}


def _check_shards(root: Path, listed: dict[str, Any], report: VerifyReport) -> None:
    """Each listed shard's size and sha256; files no row lists are notes."""
    for name, (size, sha256) in sorted(listed.items()):
        where = f"{_SHARDS}/{name}"
        path = root / _SHARDS / name
        try:
            actual = path.stat().st_size
            if actual != size:
                problem = f"has {actual} bytes where the index says {size}"
                report.problems.append(StoreProblem(where, problem))
                continue
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as error:
            report.problems.append(
                StoreProblem(where, f"cannot be read ({error.strerror})")
            )
            continue
        report.shards += 1
        if digest != sha256:
            report.problems.append(StoreProblem(where, "does not match its sha256"))
    if (root / _SHARDS).is_dir():
        for path in sorted((root / _SHARDS).iterdir()):
            if path.name not in listed:
                report.notes.append(
                    f"{_SHARDS}/{path.name} is not in the index (an orphan the "
                    f"next kalm-vllm-encode removes)"
                )


def _check_passages(
    db: sqlite3.Connection, root: Path, listed: dict[str, Any], report: VerifyReport
) -> None:
    """Read every passage's states and check them against their CRC-32."""
    shards = _Shards(root)
    # Table order, not an index's: a damaged index must not hide rows. Text as
    # bytes, so a damaged row is one problem and the scan goes on.
    db.text_factory = bytes
    query = f"SELECT rowid, {_COLUMNS} FROM passages ORDER BY rowid"
    try:
        for row in db.execute(query):
            report.passages += 1
            if (problem := _check_row(row, listed, shards)) is not None:
                report.problems.append(problem)
    except sqlite3.DatabaseError as error:
        report.problems.append(
            StoreProblem(
                _INDEX,
                f"the passage rows after the first {report.passages} cannot be "
                f"read ({error})",
            )
        )


def _check_row(
    row: tuple[Any, ...], listed: dict[str, Any], shards: _Shards
) -> StoreProblem | None:
    raw_id = row[1]
    passage_id = (
        raw_id.decode("utf-8", "backslashreplace")
        if isinstance(raw_id, bytes)
        else str(raw_id)
    )
    try:
        text: list[Any] = [
            v.decode("utf-8") if isinstance(v, bytes) else v for v in row[1:]
        ]
    except UnicodeDecodeError:
        return StoreProblem(_INDEX, "its row is not valid UTF-8", passage_id)
    if [type(v) for v in text] != _TYPES:
        return StoreProblem(
            _INDEX, "its row holds values of the wrong type", passage_id
        )
    (_, text_hash, shard, tensor, rows, tokens, truncated, key, checksum) = text[:9]
    window, windows, token_start, token_end = text[9:]
    where = f"{_SHARDS}/{shard}"
    if shard not in listed:
        return StoreProblem(where, "its shard is not listed in the index", passage_id)
    states, reason = shards.tensor(shard, tensor)
    if reason is not None:
        return StoreProblem(where, f"its states cannot be read ({reason})", passage_id)
    record = PassageRecord(
        passage_id,
        text_hash,
        rows,
        tokens,
        bool(truncated),
        key,
        window=window,
        windows=windows,
        token_start=token_start,
        token_end=token_end,
    )
    if states_crc32(record, states) != checksum:
        return StoreProblem(where, "its states do not match their checksum", passage_id)
    return None


class _Shards:
    """Open shard files, a few at a time (rows of one shard are mostly
    consecutive); a file that cannot be opened is tried once."""

    def __init__(self, root: Path) -> None:
        self._root = root / _SHARDS
        self._open: OrderedDict[str, tuple[Any, str | None]] = OrderedDict()

    def tensor(self, shard: str, tensor: str) -> tuple[Any, str | None]:
        """``(states, None)``, or ``(None, why not)``."""
        from safetensors import SafetensorError

        handle, reason = self._handle(shard)
        if reason is not None:
            return None, reason
        try:
            return handle.get_tensor(tensor), None
        except SafetensorError as error:
            return None, str(error)

    def _handle(self, shard: str) -> tuple[Any, str | None]:
        from safetensors import SafetensorError, safe_open

        if shard not in self._open:
            path = self._root / shard
            try:
                path.stat()  # a missing file as its reason, without the path
                self._open[shard] = (safe_open(path, framework="pt"), None)
            except OSError as error:
                self._open[shard] = (None, error.strerror or str(error))
            except SafetensorError as error:
                self._open[shard] = (None, str(error))
            if len(self._open) > 8:
                self._open.popitem(last=False)
        self._open.move_to_end(shard)
        return self._open[shard]


def _verify_lance(uri: str, options: Mapping[str, str]) -> VerifyReport:
    from kalm_t5gemma2_vllm_plugin.store import lance

    dataset = lance.open_dataset(uri, options)
    if dataset is None:
        raise KaLMConfigError(f"No passage store at {uri} (no Lance dataset).")
    report = VerifyReport(uri, format="lance")
    try:
        identity, hidden = lance.read_metadata(dataset.schema, uri)
    except CorruptStoreError as error:
        report.problems.append(StoreProblem("schema metadata", str(error)))
        return report
    report.shards = len(dataset.get_fragments())
    versions: list[dict[str, Any]] = []
    columns = [*lance._RECORD, *lance._VERSION]
    for row in lance.scan_rows(dataset, columns, None, states=True):
        report.passages += 1
        record = lance.to_record(row)
        _, problem = lance.decode_states(
            record, row["states"], row["states_crc32"], identity, hidden
        )
        where = f"fragment {row['fragment']}"
        if problem is not None:
            message = f"its states (window {record.window}) {problem}"
            report.problems.append(StoreProblem(where, message, record.id))
        versions.append({k: row[k] for k in ("id", "window", "windows", *columns[-2:])})
        versions[-1]["fragment"] = where
    newest = lance.newest(versions)
    for passage_id, group in newest.items():
        windows = [r["window"] for r in group]
        if windows != list(range(group[0]["windows"])) or any(
            r["windows"] != group[0]["windows"] for r in group
        ):
            problem = f"its newest rows hold windows {windows} of {group[0]['windows']}"
            report.problems.append(
                StoreProblem(group[0]["fragment"], problem, passage_id)
            )
    superseded = len(versions) - sum(len(g) for g in newest.values())
    if superseded:
        report.notes.append(
            f"{superseded} superseded row(s) (older encodings) that kalm-vllm-store "
            f"compact removes"
        )
    unindexed = lance.unindexed_fragments(dataset)
    if unindexed:
        report.notes.append(
            f"{unindexed} fragment(s) not in the id index (scanned by every lookup "
            f"until kalm-vllm-store compact)"
        )
    return report
