# SPDX-License-Identifier: Apache-2.0
"""Argument checks shared by every public entry point, so messages match everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kalm_t5gemma2_vllm_plugin.constants import SUPPORTED_ENCODER_CHUNK_SIZES
from kalm_t5gemma2_vllm_plugin.errors import KaLMInputError, KaLMInputTypeError

__all__ = [
    "check_documents",
    "check_pairs",
    "check_positive_int",
    "check_str",
    "check_top_k",
    "parse_chunk_size",
    "parse_dtype",
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
