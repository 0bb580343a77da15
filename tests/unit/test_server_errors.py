# SPDX-License-Identifier: Apache-2.0
"""The one mapping from the package's errors to HTTP (``server/errors.py``)."""

from __future__ import annotations

import pytest

from kalm_t5gemma2_vllm_plugin import errors
from kalm_t5gemma2_vllm_plugin.server.errors import api_error


@pytest.mark.parametrize(
    ("error", "status", "type_", "field"),
    [
        (
            errors.UnknownDocumentError("no 'x'", ["x"]),
            404,
            "document_not_found",
            "document_ids",
        ),
        (
            errors.UnknownModelError("m?", field="model"),
            404,
            "model_not_found",
            "model",
        ),
        (
            errors.TooManyItemsError("5 > 4", field="pairs"),
            413,
            "too_many_items",
            "pairs",
        ),
        (errors.KaLMInputError("bad", field="top_n"), 400, "invalid_request", "top_n"),
        (
            errors.KaLMInputTypeError("type", field="query"),
            400,
            "invalid_request",
            "query",
        ),
        (errors.EngineUnavailableError("starting"), 503, "unavailable", None),
        (errors.OverloadedError("busy", retry_after=2), 429, "overloaded", None),
    ],
)
def test_client_and_availability_errors_keep_their_message_and_field(
    error: errors.KaLMError, status: int, type_: str, field: str | None
) -> None:
    mapped = api_error(error)
    assert (mapped.status, mapped.type, mapped.field) == (status, type_, field)
    assert mapped.message == str(error)


def test_overload_says_when_to_retry() -> None:
    assert api_error(errors.OverloadedError("busy", retry_after=2)).headers == {
        "Retry-After": "2"
    }


@pytest.mark.parametrize(
    "error",
    [
        errors.KaLMEngineError("NaN from the engine at /secret/path"),
        errors.KaLMConfigError("checkpoint /secret/path is broken"),
    ],
)
def test_server_faults_are_500s_that_say_nothing_of_the_machine(
    error: errors.KaLMError,
) -> None:
    mapped = api_error(error)
    assert mapped.status == 500 and mapped.type == "internal_error"
    assert "/secret" not in mapped.message


def test_every_error_body_has_a_top_level_detail_for_jina_style_clients() -> None:
    """Jina-pattern clients read body["detail"] and failed with KeyError."""
    from kalm_t5gemma2_vllm_plugin.server.errors import error_body, json_error_bytes

    assert error_body("invalid_request", "top_n: bad", "top_n") == {
        "error": {"type": "invalid_request", "message": "top_n: bad", "field": "top_n"},
        "detail": "top_n: bad",
    }
    assert json_error_bytes("unauthorized", "key?") == (
        b'{"error":{"type":"unauthorized","message":"key?"},"detail":"key?"}'
    )


def test_a_503_says_when_to_retry_while_starting_or_draining() -> None:
    starting = api_error(errors.EngineUnavailableError("starting", retry_after=5))
    assert (starting.status, starting.headers) == (503, {"Retry-After": "5"})
    died = api_error(errors.EngineUnavailableError("The engine has died."))
    assert (died.status, died.headers) == (503, None)
