# SPDX-License-Identifier: Apache-2.0
"""Exception types, split by whose fault the failure is.

    KaLMError
    ├── KaLMInputError (ValueError)        bad argument from the caller -> HTTP 400
    │   └── KaLMInputTypeError (TypeError) argument of the wrong type   -> HTTP 400
    ├── KaLMConfigError (RuntimeError)     unusable checkpoint/engine setup
    ├── KaLMEngineError (RuntimeError)     failure inside the engine    -> HTTP 500/503
    └── KaLMHTTPError (RuntimeError)       non-2xx answer seen by the client

Input errors subclass ``ValueError``/``TypeError`` so callers that catch the
builtin types (as with the original KaLM adapter) keep working.
"""

from __future__ import annotations

__all__ = [
    "KaLMConfigError",
    "KaLMEngineError",
    "KaLMError",
    "KaLMHTTPError",
    "KaLMInputError",
    "KaLMInputTypeError",
]


class KaLMError(Exception):
    """Base class of every error this package raises on purpose."""


class KaLMInputError(KaLMError, ValueError):
    """A caller-supplied value is invalid; ``field`` names it when known."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class KaLMInputTypeError(KaLMInputError, TypeError):
    """A caller-supplied value has the wrong type."""


class KaLMConfigError(KaLMError, RuntimeError):
    """The checkpoint, tokenizer or engine settings cannot work together."""


class KaLMEngineError(KaLMError, RuntimeError):
    """The engine failed or returned something unusable."""


class KaLMHTTPError(KaLMError, RuntimeError):
    """The server answered with a non-2xx status."""

    def __init__(self, status: int, message: str, *, url: str = "") -> None:
        super().__init__(f"HTTP {status} from {url}: {message}" if url else message)
        self.status = status
        self.message = message
        self.url = url
