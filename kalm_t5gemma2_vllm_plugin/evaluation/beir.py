# SPDX-License-Identifier: Apache-2.0
"""A BEIR-layout dataset: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

Every malformed line is a ``KaLMInputError`` that starts with ``path:line:``.
The text the reranker reads for a document is :func:`document_text`: the
title and the text joined by a newline when the title is non-empty, else the
text alone.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError
from kalm_t5gemma2_vllm_plugin.validation import read_jsonl, unicode_problem

__all__ = [
    "DOCUMENT_TEXT_RULE",
    "BeirDataset",
    "Qrels",
    "document_text",
    "read_corpus",
    "read_qrels",
    "read_queries",
]

#: How a BEIR record becomes the document the reranker reads (for reports).
DOCUMENT_TEXT_RULE = 'title + "\\n" + text when the title is non-empty, else text'

#: ``{query id: {document id: graded label}}``.
Qrels = dict[str, dict[str, int]]


def document_text(title: str, text: str) -> str:
    """The text the reranker reads for one BEIR corpus record.

    Example:
        >>> document_text("Rust", "Iron rusts in water.")
        'Rust\\nIron rusts in water.'
        >>> document_text("", "Iron rusts in water.")
        'Iron rusts in water.'
    """
    return f"{title}\n{text}" if title else text


def _open_lines(path: Path) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            yield from f
    except FileNotFoundError:
        raise KaLMInputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise KaLMInputError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise KaLMInputError(f"{path}: cannot read ({exc.strerror})") from None


def _field_id(record: dict[str, Any], where: str) -> str:
    """A record's ``_id``: a string (an integer, as some exports write, is
    taken as its decimal text)."""
    value = record.get("_id")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise KaLMInputError(f"{where}: field '_id' must be a non-empty string")
    if value.split() != [value]:
        raise KaLMInputError(
            f"{where}: _id {value!r} contains whitespace, which a TREC run file "
            f"cannot hold"
        )
    return value


def _field_text(record: dict[str, Any], key: str, where: str, default: Any) -> str:
    value = record.get(key, default)
    if not isinstance(value, str):
        raise KaLMInputError(f"{where}: field {key!r} must be a string")
    if problem := unicode_problem(value):
        raise KaLMInputError(f"{where}: field {key!r} {problem}")
    return value


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for line_number, data in read_jsonl(_open_lines(path), str(path)):
        if isinstance(data, KaLMInputError):
            raise data
        where = f"{path}:{line_number}"
        if not isinstance(data, dict):
            raise KaLMInputError(
                f"{where}: a record must be a JSON object, got {type(data).__name__}"
            )
        yield where, data


def read_corpus(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{document id: text the reranker reads}`` from a BEIR ``corpus.jsonl``
    (records ``{"_id", "title"?, "text"}``)."""
    path = Path(path)
    corpus: dict[str, str] = {}
    for where, record in _records(path):
        doc_id = _field_id(record, where)
        if doc_id in corpus:
            raise KaLMInputError(f"{where}: document id {doc_id!r} appears twice")
        title = _field_text(record, "title", where, "")
        corpus[doc_id] = document_text(title, _field_text(record, "text", where, None))
    return corpus


def read_queries(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{query id: text}`` from a BEIR ``queries.jsonl`` (``{"_id", "text"}``)."""
    path = Path(path)
    queries: dict[str, str] = {}
    for where, record in _records(path):
        query_id = _field_id(record, where)
        if query_id in queries:
            raise KaLMInputError(f"{where}: query id {query_id!r} appears twice")
        queries[query_id] = _field_text(record, "text", where, None)
    return queries


def read_qrels(
    path: str | os.PathLike[str], queries: Collection[str] | None = None
) -> Qrels:
    """Graded judgements from a BEIR qrels TSV (``query-id corpus-id score``,
    with or without that header line); a label is an integer, 0 = not relevant.

    ``queries``: the known query ids; a judgement of any other query is refused.
    """
    path = Path(path)
    qrels: Qrels = {}
    for line_number, raw in enumerate(_open_lines(path), start=1):
        where = f"{path}:{line_number}"
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise KaLMInputError(f"{where}: not valid UTF-8") from None
        if not line:
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if line_number == 1 and fields[:2] == ["query-id", "corpus-id"]:
            continue
        if len(fields) != 3:
            raise KaLMInputError(
                f"{where}: expected 3 tab-separated fields "
                f"(query-id, corpus-id, score), got {len(fields)}"
            )
        query_id, doc_id, label = (f.strip() for f in fields)
        try:
            grade = int(label)
        except ValueError:
            raise KaLMInputError(
                f"{where}: score {label!r} is not an integer relevance label"
            ) from None
        if queries is not None and query_id not in queries:
            raise KaLMInputError(f"{where}: query {query_id!r} is not in queries.jsonl")
        judged = qrels.setdefault(query_id, {})
        if doc_id in judged:
            raise KaLMInputError(
                f"{where}: query {query_id!r} judges document {doc_id!r} twice"
            )
        judged[doc_id] = grade
    return qrels


@dataclass
class BeirDataset:
    """Paths of one BEIR-layout directory and the parts read so far."""

    root: Path
    split: str = "test"

    @property
    def corpus_path(self) -> Path:
        return self.root / "corpus.jsonl"

    @property
    def queries_path(self) -> Path:
        return self.root / "queries.jsonl"

    @property
    def qrels_path(self) -> Path:
        return self.root / "qrels" / f"{self.split}.tsv"

    def check_layout(self) -> None:
        """Refuse a directory that is not in BEIR layout, naming what is missing."""
        if not self.root.is_dir():
            raise KaLMInputError(f"{self.root}: no such directory (the BEIR dataset)")
        if not self.queries_path.is_file():
            raise KaLMInputError(f"{self.queries_path}: no such file")
        if not self.qrels_path.is_file():
            splits = sorted(p.stem for p in (self.root / "qrels").glob("*.tsv"))
            hint = f" (splits here: {', '.join(splits)})" if splits else ""
            raise KaLMInputError(f"{self.qrels_path}: no such file{hint}")
