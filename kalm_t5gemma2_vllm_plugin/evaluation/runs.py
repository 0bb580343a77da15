# SPDX-License-Identifier: Apache-2.0
"""Run files: read a TREC run or a BEIR-style JSON run, cut it to the top
``depth`` per query, and write TREC runs in one deterministic order.

Order everywhere (candidates, written runs): score descending, then document
id ascending; queries by id. Scores are written as ``repr(float)``, which reads
back to the same float, so a run file is a pure function of its scores.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError

__all__ = [
    "Candidates",
    "Run",
    "RunFile",
    "format_trec",
    "read_run",
    "top_candidates",
    "write_atomic",
    "write_trec",
]

#: ``{query id: {document id: score}}``.
Run = dict[str, dict[str, float]]
#: ``{query id: [(document id, first-stage score), ...]}`` best first.
Candidates = dict[str, list[tuple[str, float]]]


@dataclass
class RunFile:
    """A first-stage run read from a file, and where each entry came from."""

    path: Path
    scores: Run
    #: TREC: the line of each ``(query id, document id)``.
    lines: dict[tuple[str, str], int] = field(default_factory=dict)
    #: JSON: the text, to find an entry's line for a message.
    text: str = ""

    def where(self, query_id: str, doc_id: str) -> str:
        """``path:line`` of an entry, for messages."""
        line = self.lines.get((query_id, doc_id))
        if line is None:  # JSON: the document key after the query key
            start = self.text.find(json.dumps(query_id))
            position = self.text.find(json.dumps(doc_id), max(start, 0))
            line = self.text.count("\n", 0, max(position, start, 0)) + 1
        return f"{self.path}:{line}"


def read_run(path: str | os.PathLike[str], queries: Collection[str]) -> RunFile:
    """A first-stage run from a TREC run file (``qid Q0 docid rank score tag``)
    or a BEIR-style JSON file (``{qid: {docid: score}}``), told apart by content.

    ``queries``: the known query ids; a run naming any other query is refused.
    Errors name the file and the line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KaLMInputError(f"{path}: no such file (the first-stage run)") from None
    except OSError as exc:
        raise KaLMInputError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise KaLMInputError(f"{path}:{line}: not valid UTF-8") from None
    if text.lstrip().startswith("{"):
        return RunFile(path, _read_json_run(path, text, queries), text=text)
    lines: dict[tuple[str, str], int] = {}
    return RunFile(path, _read_trec_run(path, text, queries, lines), lines)


def _score(value: str, where: str) -> float:
    try:
        score = float(value)
    except ValueError:
        raise KaLMInputError(f"{where}: score {value!r} is not a number") from None
    if not math.isfinite(score):
        raise KaLMInputError(f"{where}: score {value!r} is not finite")
    return score


def _check_id(value: str, what: str, where: str) -> None:
    if not value or value.split() != [value]:
        raise KaLMInputError(
            f"{where}: {what} {value!r} is empty or contains whitespace, which a "
            f"TREC run file cannot hold"
        )


def _read_trec_run(
    path: Path, text: str, queries: Collection[str], seen: dict[tuple[str, str], int]
) -> Run:
    run: Run = {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{line_number}"
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6:
            raise KaLMInputError(
                f"{where}: a TREC run line has 6 fields (qid Q0 docid rank score "
                f"tag), got {len(fields)}"
            )
        query_id, _, doc_id, rank, score, _ = fields
        if not rank.lstrip("-").isdigit():
            raise KaLMInputError(f"{where}: rank {rank!r} is not an integer")
        if query_id not in queries:
            raise KaLMInputError(f"{where}: query {query_id!r} is not in queries.jsonl")
        if (first := seen.setdefault((query_id, doc_id), line_number)) != line_number:
            raise KaLMInputError(
                f"{where}: query {query_id!r} lists document {doc_id!r} again "
                f"(first on line {first})"
            )
        run.setdefault(query_id, {})[doc_id] = _score(score, where)
    return run


def _line_of(text: str, key: str) -> int:
    """The line where ``key`` first appears as a JSON string (for messages)."""
    position = text.find(json.dumps(key))
    return text.count("\n", 0, max(position, 0)) + 1


def _read_json_run(path: Path, text: str, queries: Collection[str]) -> Run:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KaLMInputError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise KaLMInputError(f"{path}: invalid JSON (nested too deeply)") from None
    run: Run = {}
    for query_id, scores in data.items():
        where = f"{path}:{_line_of(text, query_id)}"
        _check_id(query_id, "query id", where)
        if query_id not in queries:
            raise KaLMInputError(f"{where}: query {query_id!r} is not in queries.jsonl")
        if not isinstance(scores, dict):
            raise KaLMInputError(
                f"{where}: query {query_id!r} must map document ids to scores "
                f'({{"docid": score}}), got {type(scores).__name__}'
            )
        run[query_id] = {}
        for doc_id, score in scores.items():
            _check_id(doc_id, "document id", where)
            if isinstance(score, bool) or not isinstance(score, int | float):
                raise KaLMInputError(
                    f"{where}: query {query_id!r}, document {doc_id!r}: score must "
                    f"be a number, got {type(score).__name__}"
                )
            run[query_id][doc_id] = _score(repr(score), where)
    return run


def _order(item: tuple[str, float]) -> tuple[float, str]:
    return (-item[1], item[0])


def top_candidates(run: Mapping[str, Mapping[str, float]], depth: int) -> Candidates:
    """The best ``depth`` documents per query: score descending, ties by id.

    Example:
        >>> top_candidates({"q1": {"b": 1.0, "a": 1.0, "c": 2.0}}, 2)
        {'q1': [('c', 2.0), ('a', 1.0)]}
    """
    return {
        query_id: sorted(scores.items(), key=_order)[:depth]
        for query_id, scores in sorted(run.items())
    }


def format_trec(run: Mapping[str, Mapping[str, float]], tag: str) -> Iterator[str]:
    """TREC run lines: queries by id, then score descending, ties by document
    id; ranks from 1; scores as ``repr`` (exact).

    Example:
        >>> list(format_trec({"q1": {"d2": 0.5, "d1": 0.5}}, "kalm"))
        ['q1 Q0 d1 1 0.5 kalm\\n', 'q1 Q0 d2 2 0.5 kalm\\n']
    """
    for query_id in sorted(run):
        ranked = sorted(run[query_id].items(), key=_order)
        for rank, (doc_id, score) in enumerate(ranked, start=1):
            yield f"{query_id} Q0 {doc_id} {rank} {float(score)!r} {tag}\n"


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` under a temporary name in its directory, then
    rename it into place (readers see the old file or the whole new one)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return target


def write_trec(
    path: str | os.PathLike[str], run: Mapping[str, Mapping[str, float]], tag: str
) -> Path:
    """Write ``run`` as a TREC run file (``format_trec`` order), atomically."""
    return write_atomic(path, "".join(format_trec(run, tag)))
