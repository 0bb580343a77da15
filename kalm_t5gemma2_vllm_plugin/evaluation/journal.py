# SPDX-License-Identifier: Apache-2.0
"""The resume journal: one JSON line per finished query, fsynced as it is written.

Layout of ``journal.jsonl``::

    {"kalm_eval_journal": 1, "arguments": {...}, "engine": {...}}   header
    {"qid": "q01", "scores": {"reranked": {"doc3": 0.91, ...}}}     one per query

``scores`` maps each reranked run's name (``reranked``, or ``chunk_size=N`` in a
sweep) to that query's document scores, written with ``repr`` precision (JSON
floats read back exactly). A run killed at any moment leaves every finished
query readable and at worst a torn last line, which the next run drops before
it appends. A header whose arguments or engine differ from this run's is an
error naming each difference, unless the run restarts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError

__all__ = ["JOURNAL_NAME", "Journal", "QueryScores"]

JOURNAL_NAME = "journal.jsonl"
_VERSION = 1
#: ``{run name: {document id: score}}`` of one query.
QueryScores = dict[str, dict[str, float]]


def _differences(kind: str, journal: Any, now: Any) -> list[str]:
    if not isinstance(journal, dict) or not isinstance(now, dict):
        if journal == now:
            return []
        return [f"{kind}: {journal!r} (journal) vs {now!r} (now)"]
    keys = sorted(set(journal) | set(now), key=str)
    return [
        f"{kind}.{key}: {journal.get(key)!r} (journal) vs {now.get(key)!r} (now)"
        for key in keys
        if journal.get(key) != now.get(key)
    ]


class Journal:
    """Finished queries of one evaluation, kept in ``directory/journal.jsonl``.

    Args:
        directory: the output directory.
        header: ``{"arguments": {...}, "engine": {...}}`` of this run (JSON).
        restart: drop an existing journal instead of resuming it.

    A journal written by a run with another header is refused (``KaLMInputError``
    naming what differs). ``done`` holds the queries read back.
    """

    def __init__(
        self, directory: Path, header: Mapping[str, Any], *, restart: bool = False
    ) -> None:
        self.path = directory / JOURNAL_NAME
        self.header = {"kalm_eval_journal": _VERSION, **header}
        self.done: dict[str, QueryScores] = {}
        directory.mkdir(parents=True, exist_ok=True)
        if restart or not self.path.exists():
            self._create()
        else:
            self._resume()
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    @staticmethod
    def check_section(directory: Path, section: str, now: Mapping[str, Any]) -> None:
        """Refuse early (before an engine starts) to resume a journal in
        ``directory`` whose header ``section`` differs from ``now``."""
        path = directory / JOURNAL_NAME
        try:
            with open(path, "rb") as f:
                first = f.readline()
        except FileNotFoundError:
            return
        if first.endswith(b"\n"):
            stored = _parse(path, first.decode("utf-8", errors="replace"), 1)
            _compare(path, {section: stored.get(section)}, {section: dict(now)})

    def append(self, query_id: str, scores: QueryScores) -> None:
        """Record one finished query durably (written and fsynced)."""
        assert self._file is not None, "journal closed"
        self._file.write(
            json.dumps({"qid": query_id, "scores": scores}, ensure_ascii=False) + "\n"
        )
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done[query_id] = scores

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers ----------------------------------------------------------------
    def _create(self) -> None:
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.header, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.path)
        _fsync_dir(self.path.parent)

    def _resume(self) -> None:
        data = self.path.read_bytes()
        # Everything after the last newline is a line torn by a kill: dropped.
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(whole))
                os.fsync(f.fileno())
        lines = whole.decode("utf-8", errors="replace").splitlines()
        if not lines:
            self._create()
            return
        stored = _parse(self.path, lines[0], 1)
        if stored.get("kalm_eval_journal") != _VERSION:
            raise _damaged(self.path, 1, "not a kalm-vllm-eval journal header")
        _compare(self.path, stored, self.header)
        for line_number, line in enumerate(lines[1:], start=2):
            entry = _parse(self.path, line, line_number)
            query_id, scores = entry.get("qid"), entry.get("scores")
            if not isinstance(query_id, str) or not isinstance(scores, dict):
                raise _damaged(self.path, line_number, "not a query entry")
            self.done[query_id] = scores


def _compare(path: Path, stored: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    problems = [
        problem
        for section in sorted(set(stored) | set(now))
        for problem in _differences(section, stored.get(section), now.get(section))
    ]
    if problems:
        raise KaLMInputError(
            f"{path} was written by a run with other settings: "
            f"{'; '.join(problems)}. Rerun with the same arguments to resume it, "
            f"or pass --restart to start over.",
            field="restart",
        )


def _parse(path: Path, line: str, line_number: int) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _damaged(path, line_number, f"invalid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise _damaged(path, line_number, "not a JSON object")
    return value


def _damaged(path: Path, line_number: int, problem: str) -> KaLMInputError:
    return KaLMInputError(
        f"{path}:{line_number}: {problem}; the journal is damaged. Pass --restart "
        f"to start over (or delete the file).",
        field="restart",
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
