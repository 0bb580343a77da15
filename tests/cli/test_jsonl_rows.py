# SPDX-License-Identifier: Apache-2.0
"""Lines of a JSONL input that are not valid rows: each is an error naming its
line, for ``kalm-vllm-rerank`` and ``kalm-vllm-encode`` alike (no engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin.cli.rerank import _read_rows, _Row
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError
from kalm_t5gemma2_vllm_plugin.store.encoder import _read_input

GOOD = b'{"query": "q", "document": "d", "id": "i"}'
SURROGATE = "must be valid Unicode text; found a lone surrogate U+D800 at character 1"

#: (bad line, the reason after "path:2: "), one per way a line can be broken.
BAD_LINES = {
    "latin-1": (
        b'{"query": "caf\xe9", "document": "d"}',
        "not valid UTF-8 (byte 0xE9 at byte 15 of the line: invalid continuation byte)",
    ),
    "cesu-8-surrogate": (
        b'{"query": "a\xed\xa0\x80", "document": "d"}',
        "not valid UTF-8 (byte 0xED at byte 13 of the line: invalid continuation byte)",
    ),
    "truncated-utf-8": (
        b'{"query": "\xe4\xb8", "document": "d"}',
        "not valid UTF-8 (byte 0xE4 at byte 12 of the line: invalid continuation byte)",
    ),
    "utf-16-without-bom": (
        GOOD.decode().encode("utf-16-le"),
        "contains NUL bytes, which UTF-8 JSON never has; the input must be UTF-8 "
        "(is the file UTF-16?)",
    ),
    "surrogate-in-query": (
        b'{"query": "a\\ud800", "document": "d"}',
        f"field 'query' {SURROGATE}",
    ),
    "surrogate-in-document": (
        b'{"query": "q", "document": "a\\ud800"}',
        f"field 'document' {SURROGATE}",
    ),
    "surrogate-in-instruction": (
        b'{"query": "q", "document": "d", "instruction": "a\\ud800"}',
        f"field 'instruction' {SURROGATE}",
    ),
    "surrogate-in-id": (
        b'{"query": "q", "document": "d", "id": {"k": ["a\\ud800"]}}',
        f"field 'id' {SURROGATE} (at k.0)",
    ),
    "nested-100000-deep": (
        b'{"query": "q", "document": "d", "x": '
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}",
        "invalid JSON (nested too deeply)",
    ),
    "10000-digit-number": (
        b'{"query": "q", "document": "d", "id": ' + b"7" * 10_000 + b"}",
        "invalid JSON (a number has more than 4300 digits)",
    ),
    "nan-id": (
        b'{"query": "q", "document": "d", "id": NaN}',
        "field 'id' must not hold NaN or Infinity, which JSON cannot represent",
    ),
    "overflowing-float-id": (
        b'{"query": "q", "document": "d", "id": [1e400]}',
        "field 'id' must not hold NaN or Infinity, which JSON cannot represent",
    ),
}


def _lines(*rows: bytes) -> list[bytes]:
    return [row + b"\n" for row in rows]


@pytest.mark.parametrize("bad,reason", BAD_LINES.values(), ids=list(BAD_LINES))
def test_rerank_rows_report_a_broken_line_and_keep_the_others(
    bad: bytes, reason: str
) -> None:
    items = list(_read_rows(_lines(GOOD, bad, GOOD), "in.jsonl"))
    assert [type(i) for i in items] == [_Row, KaLMInputError, _Row]
    assert str(items[1]) == f"in.jsonl:2: {reason}"
    assert [i.index for i in items if isinstance(i, _Row)] == [0, 2]


def test_a_utf16_file_is_an_error_on_every_line_the_first_naming_the_bom(
    tmp_path: Path,
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([GOOD.decode()] * 3) + "\n", encoding="utf-16")
    with open(source, "rb") as lines:
        items = list(_read_rows(lines, "in.jsonl"))
    assert items and all(isinstance(i, KaLMInputError) for i in items)
    assert str(items[0]) == (
        "in.jsonl:1: starts with a UTF-16 byte-order mark; the input must be UTF-8 "
        "(convert it with: iconv -f UTF-16 -t UTF-8)"
    )
    assert str(items[1]).startswith("in.jsonl:2: contains NUL bytes")


def test_a_utf8_bom_and_valid_odd_text_are_fine() -> None:
    text = "emoji \U0001f600 and NUL \u0000"
    row = json.dumps({"query": text, "document": text, "id": [text, 1.5]}).encode()
    items = list(_read_rows(_lines(b"\xef\xbb\xbf" + GOOD, row), "in.jsonl"))
    assert [i.id for i in items] == ["i", [text, 1.5]]  # type: ignore[union-attr]
    assert items[1].query == text  # type: ignore[union-attr]


ENCODE_BAD = {
    name: (bad.replace(b'"query": "q", "document"', b'"id": "x", "text"'), reason)
    for name, (bad, reason) in BAD_LINES.items()
    if "surrogate-in" not in name and "-id" not in name and "number" not in name
}
ENCODE_BAD["surrogate-in-text"] = (
    b'{"id": "x", "text": "a\\ud800"}',
    f"field 'text' {SURROGATE}",
)
ENCODE_BAD["surrogate-in-id"] = (
    b'{"id": "a\\ud800", "text": "t"}',
    f"field 'id' {SURROGATE}",
)
ENCODE_BAD["10000-digit-number"] = (
    b'{"id": "x", "text": "t", "n": ' + b"7" * 10_000 + b"}",
    "invalid JSON (a number has more than 4300 digits)",
)


@pytest.mark.parametrize("bad,reason", ENCODE_BAD.values(), ids=list(ENCODE_BAD))
def test_encode_rows_report_a_broken_line_or_skip_it(
    tmp_path: Path, bad: bytes, reason: str
) -> None:
    source = tmp_path / "corpus.jsonl"
    source.write_bytes(b"".join(_lines(b'{"id": "a", "text": "t"}', bad, b"")))
    with pytest.raises(KaLMInputError) as raised:
        list(_read_input(source))
    assert str(raised.value) == f"{source}:2: {reason}"
    invalid: list[KaLMInputError] = []
    assert [row[1] for row in _read_input(source, invalid)] == ["a"]
    assert [str(e) for e in invalid] == [f"{source}:2: {reason}"]
