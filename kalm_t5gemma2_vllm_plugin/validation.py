# SPDX-License-Identifier: Apache-2.0
"""Argument checks shared by every public entry point, so messages match everywhere."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from kalm_t5gemma2_vllm_plugin.constants import SUPPORTED_ENCODER_CHUNK_SIZES
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError, KaLMInputTypeError

__all__ = [
    "check_documents",
    "check_json_output",
    "check_pairs",
    "check_positive_int",
    "check_request_chunk_size",
    "check_str",
    "check_top_k",
    "json_echo_problem",
    "json_unicode_problem",
    "lenient_bool",
    "parse_chunk_size",
    "parse_dtype",
    "read_jsonl",
    "unicode_problem",
]

_NO_POOLING = ("", "none", "null")
#: Spellings accepted for a dtype -> the one name vLLM, torch and stores use.
_DTYPE_NAMES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise KaLMInputTypeError(
            f"{name} must be a str, got {_type_name(value)}.", field=name
        )
    return value


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KaLMInputTypeError(
            f"{name} must be a positive int, got {_type_name(value)}.", field=name
        )
    if value <= 0:
        raise KaLMInputError(f"{name} must be a positive int, got {value}.", field=name)
    return value


def check_top_k(top_k: Any, name: str = "top_k") -> int | None:
    """``None`` means every result; otherwise an int >= 0 (0 gives ``[]``)."""
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise KaLMInputTypeError(
            f"{name} must be None or an int >= 0, got {_type_name(top_k)}.", field=name
        )
    if top_k < 0:
        raise KaLMInputError(
            f"{name} must be None or an int >= 0, got {top_k}.", field=name
        )
    return top_k


def parse_chunk_size(value: Any, name: str = "chunk_size") -> int | None:
    """A pooling factor from {1, 2, 4, 8, 16, 32}, or ``None`` for no pooling.

    ``None`` and the strings ``""``, ``"none"``, ``"null"`` mean no pooling, which
    is mathematically the same as a factor of 1. (The original vLLM adapter
    silently read them as 4; here they mean what they say.)
    """
    if value is None or (
        isinstance(value, str) and value.strip().lower() in _NO_POOLING
    ):
        return None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    valid = isinstance(value, int) and not isinstance(value, bool)
    if not valid or value not in SUPPORTED_ENCODER_CHUNK_SIZES:
        raise KaLMInputError(
            f"{name} must be one of {list(SUPPORTED_ENCODER_CHUNK_SIZES)} or None "
            f"(no pooling); got {value!r}.",
            field=name,
        )
    return value


def check_request_chunk_size(
    value: Any, engine_chunk_size: int | None, name: str = "encoder_chunk_size"
) -> int:
    """A request's pooling factor (per-request compression); ``None``: the
    engine's. Pooled states at the engine's factor N re-pool exactly to any
    multiple of N up to 32; a finer factor cannot be recovered from them."""
    engine = engine_chunk_size or 1
    if value is None:
        return engine
    if isinstance(value, bool) or not isinstance(value, int):
        raise KaLMInputTypeError(
            f"{name} must be an integer, got {_type_name(value)}.", field=name
        )
    top = SUPPORTED_ENCODER_CHUNK_SIZES[-1]
    if value > top and value & (value - 1) == 0:
        raise KaLMInputError(
            f"{name}={value}: the model was trained for Matryoshka compression "
            f"1x to {top}x ({list(SUPPORTED_ENCODER_CHUNK_SIZES)}); {value}x is "
            f"beyond what it has seen.",
            field=name,
        )
    if value not in SUPPORTED_ENCODER_CHUNK_SIZES:
        raise KaLMInputError(
            f"{name} must be one of {list(SUPPORTED_ENCODER_CHUNK_SIZES)}; got "
            f"{value!r}.",
            field=name,
        )
    if value % engine:
        raise KaLMInputError(
            f"{name}={value} is finer than this engine's chunk size {engine}: "
            f"its passage states are pooled at {engine} and a finer size cannot "
            f"be recovered from them. Ask for a multiple of {engine} (up to "
            f"{top}), or start an engine with encoder chunk size {value}.",
            field=name,
        )
    return value


def check_documents(documents: Any, name: str = "documents") -> list[str]:
    if isinstance(documents, str) or not isinstance(documents, Sequence):
        raise KaLMInputTypeError(
            f"{name} must be a list of str, got {_type_name(documents)}.", field=name
        )
    return [check_str(doc, f"{name}[{i}]") for i, doc in enumerate(documents)]


def check_pairs(pairs: Any, name: str = "pairs") -> list[tuple[str, str]]:
    """A sequence of ``(query, document)`` string pairs, returned as tuples."""
    if isinstance(pairs, str) or not isinstance(pairs, Sequence):
        raise KaLMInputTypeError(
            f"{name} must be a list of (query, document) pairs, got "
            f"{_type_name(pairs)}.",
            field=name,
        )
    checked = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise KaLMInputError(
                f"{name}[{i}] must be a (query, document) pair of two str.",
                field=f"{name}[{i}]",
            )
        query = check_str(pair[0], f"{name}[{i}][0] (query)")
        document = check_str(pair[1], f"{name}[{i}][1] (document)")
        checked.append((query, document))
    return checked


def parse_dtype(value: Any, name: str = "dtype") -> str | None:
    """One canonical dtype name (``"bfloat16"``, ``"float16"``, ``"float32"``).

    Accepts the usual spellings (``bf16``, ``fp32``, ``half`` ...) and
    ``torch.dtype`` objects; ``None`` stays ``None`` (the caller's default).
    """
    if value is None:
        return None
    key = str(value).removeprefix("torch.").strip().lower()
    if key not in _DTYPE_NAMES:
        raise KaLMInputError(
            f"{name} must be one of {sorted(set(_DTYPE_NAMES.values()))} (or "
            f"bf16/fp16/fp32), got {value!r}.",
            field=name,
        )
    return _DTYPE_NAMES[key]


# --- text and JSON lines from outside ------------------------------------------------
_SURROGATE = re.compile("[\ud800-\udfff]")
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def unicode_problem(text: str) -> str | None:
    """Why ``text`` is not Unicode text that UTF-8 can carry, or ``None``.

    A Python ``str`` may hold a lone UTF-16 surrogate (JSON's ``"\\ud800"``, or
    CESU-8 bytes decoded with ``surrogatepass``); no tokenizer, hash or UTF-8
    writer accepts one, so every text from outside is checked here first.

    Example:
        >>> unicode_problem("caf\\u00e9") is None
        True
        >>> unicode_problem("a\\ud800")
        'must be valid Unicode text; found a lone surrogate U+D800 at character 1'
    """
    if text.isascii():
        return None
    match = _SURROGATE.search(text)
    if match is None:
        return None
    return (
        f"must be valid Unicode text; found a lone surrogate "
        f"U+{ord(match.group()):04X} at character {match.start()}"
    )


def _json_strings(value: Any) -> Iterator[tuple[str, str]]:
    """``(where inside value, string)`` for every string and key in a JSON
    value, without recursion (so nesting depth never matters)."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            yield f"at {path}" if path else "", item
        elif isinstance(item, dict):
            for key, child in item.items():
                yield f"in a key at {path}" if path else "in a key", str(key)
                stack.append((f"{path}.{key}" if path else str(key), child))
        elif isinstance(item, list | tuple):
            stack.extend(
                (f"{path}.{i}" if path else str(i), child)
                for i, child in enumerate(item)
            )


def json_unicode_problem(value: Any) -> str | None:
    """:func:`unicode_problem` for any string or key inside a JSON value."""
    for where, text in _json_strings(value):
        if (problem := unicode_problem(text)) is not None:
            return f"{problem} ({where})" if where else problem
    return None


#: Deepest nesting of a JSON value that is echoed back (a ``/score`` id); far
#: beyond any real id, far below what pydantic's serializer refuses (~255).
MAX_ECHO_DEPTH = 64


def json_echo_problem(value: Any, max_depth: int = MAX_ECHO_DEPTH) -> str | None:
    """Why a JSON value from a request cannot be written back unchanged, or
    ``None``: a lone surrogate, NaN or Infinity (JSON has neither; it would
    come back as ``null``), or nesting deeper than ``max_depth``. No recursion,
    so any depth is safe to check.

    Example:
        >>> json_echo_problem({"a": [1, float("nan")]})
        'must not hold NaN or Infinity, which JSON cannot represent (at a.1)'
        >>> json_echo_problem([[["x"]]], max_depth=2)
        'is nested more than 2 levels deep'
    """
    stack: list[tuple[str, int, Any]] = [("", 0, value)]
    while stack:
        path, depth, item = stack.pop()
        where = f" (at {path})" if path else ""
        if isinstance(item, float) and not math.isfinite(item):
            return f"must not hold NaN or Infinity, which JSON cannot represent{where}"
        if isinstance(item, dict | list | tuple):
            if depth >= max_depth:
                return f"is nested more than {max_depth} levels deep"
            children = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend(
                (f"{path}.{key}" if path else str(key), depth + 1, child)
                for key, child in children
            )
    return json_unicode_problem(value)


#: The strings read as booleans; only JSON's own words, so that a typo or a
#: "yes" still fails loudly.
_BOOLEAN_WORDS = {"true": True, "false": False}


def lenient_bool(value: Any) -> Any:
    """``"true"``/``"false"`` (any case, as some clients send JSON booleans)
    as bools; anything else unchanged, for the strict check after it.

    Example:
        >>> lenient_bool("True"), lenient_bool(" false"), lenient_bool("maybe")
        (True, False, 'maybe')
    """
    if isinstance(value, str):
        return _BOOLEAN_WORDS.get(value.strip().lower(), value)
    return value


def check_json_output(value: Any, name: str) -> None:
    """Raise unless ``value`` can be written back as strict UTF-8 JSON (an id
    echoed in an output row): no lone surrogate, no NaN or Infinity, and no
    nesting too deep to write."""
    if (problem := json_unicode_problem(value)) is not None:
        raise KaLMInputError(f"{name} {problem}", field=name)
    try:
        json.dumps(value, allow_nan=False)
    except RecursionError:
        raise KaLMInputError(
            f"{name} is nested too deeply to be written back", field=name
        ) from None
    except ValueError:
        raise KaLMInputError(
            f"{name} must not hold NaN or Infinity, which JSON cannot represent",
            field=name,
        ) from None


def _parse_int(digits: str) -> int:
    limit = sys.get_int_max_str_digits()
    if limit and len(digits.lstrip("-")) > limit:
        raise ValueError(f"a number has more than {limit} digits")
    return int(digits)


def _decode_line(raw: bytes | str, line_number: int) -> str:
    """One line as text; ``ValueError`` saying why it is not UTF-8 JSON text."""
    if isinstance(raw, str):  # a text stream (already decoded by its owner)
        return raw
    if line_number == 1:
        if raw.startswith(_UTF16_BOMS):
            raise ValueError(
                "starts with a UTF-16 byte-order mark; the input must be UTF-8 "
                "(convert it with: iconv -f UTF-16 -t UTF-8)"
            )
        raw = raw.removeprefix(_UTF8_BOM)
    if b"\0" in raw:
        raise ValueError(
            "contains NUL bytes, which UTF-8 JSON never has; the input must be "
            "UTF-8 (is the file UTF-16?)"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02X} at byte {exc.start + 1} "
            f"of the line: {exc.reason})"
        ) from None


def _parse_line(raw: bytes | str, line_number: int) -> Any:
    text = _decode_line(raw, line_number)
    try:
        return json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise ValueError("invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # from _parse_int
        raise ValueError(f"invalid JSON ({exc})") from None


def read_jsonl(
    lines: Iterable[bytes | str], name: str
) -> Iterator[tuple[int, Any | KaLMInputError]]:
    """``(line number, JSON value or the error for that line)`` per non-blank
    line; errors start with ``name:line:``. Every way a line can fail to be a UTF-8 JSON
    text (bad bytes, UTF-16, a number beyond Python's int-string limit, nesting
    beyond the recursion limit) is an input error naming the line, so one bad
    line never costs the lines around it. A UTF-8 byte-order mark is allowed.

    Example:
        >>> lines = [b'{"a": 1}\\n', b"\\n", b"\\xe9\\n"]
        >>> for line_number, row in read_jsonl(lines, "in"):
        ...     print(row)
        {'a': 1}
        in:3: not valid UTF-8 (byte 0xE9 at byte 1 of the line: invalid ...)
    """
    for line_number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            yield line_number, _parse_line(raw, line_number)
        except ValueError as exc:
            yield line_number, KaLMInputError(f"{name}:{line_number}: {exc}")
