# SPDX-License-Identifier: Apache-2.0
"""Exception types, split by whose fault the failure is.

    KaLMError
    ├── KaLMInputError (ValueError)        bad argument from the caller -> HTTP 400
    │   ├── KaLMInputTypeError (TypeError) argument of the wrong type   -> HTTP 400
    │   ├── UnknownDocumentError (KeyError) id not in the passage store -> HTTP 404
    │   ├── UnknownModelError              model name not served       -> HTTP 404
    │   └── TooManyItemsError              over a per-request limit    -> HTTP 413
    ├── KaLMConfigError (RuntimeError)     unusable checkpoint/engine setup
    │   └── CorruptStoreError              passage store fails its checks -> HTTP 500
    ├── KaLMEngineError (RuntimeError)     failure inside the engine    -> HTTP 500
    │   ├── EngineUnavailableError         starting, stopped or died    -> HTTP 503
    │   └── OverloadedError                too many requests in flight  -> HTTP 429
    └── KaLMHTTPError (RuntimeError)       non-2xx answer seen by the client

Status codes are chosen in one place, ``server/errors.py``; nothing else in the
package knows HTTP.

Input errors subclass ``ValueError``/``TypeError`` so callers that catch the
builtin types (as with the original KaLM adapter) keep working.
"""

from __future__ import annotations

__all__ = [
    "CorruptStoreError",
    "KaLMConfigError",
    "KaLMEngineError",
    "KaLMError",
    "KaLMHTTPError",
    "KaLMInputError",
    "KaLMInputTypeError",
    "OverloadedError",
    "TooManyItemsError",
    "EngineUnavailableError",
    "UnknownDocumentError",
    "UnknownModelError",
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


class UnknownDocumentError(KaLMInputError, KeyError):
    """Documents given by id that the passage store does not hold.

    Also a ``KeyError``, so callers that looked ids up like a mapping keep
    working; ``str()`` is the message (not ``KeyError``'s quoted repr).
    """

    def __init__(self, message: str, ids: list[str]) -> None:
        super().__init__(message, field="document_ids")
        self.ids = ids

    def __str__(self) -> str:
        return str(self.args[0])


class UnknownModelError(KaLMInputError):
    """A request named a model this server does not serve."""


class TooManyItemsError(KaLMInputError):
    """A request holds more items than this server accepts."""


class KaLMConfigError(KaLMError, RuntimeError):
    """The checkpoint, tokenizer or engine settings cannot work together."""


class CorruptStoreError(KaLMConfigError):
    """Passage store data fails its checksum or consistency checks.

    ``passage_id`` and ``file`` (a name inside the store, never a path) say
    where, when known; the message names both and no path of the machine.
    """

    def __init__(
        self, message: str, *, passage_id: str | None = None, file: str | None = None
    ) -> None:
        super().__init__(message)
        self.passage_id = passage_id
        self.file = file


class KaLMEngineError(KaLMError, RuntimeError):
    """The engine failed or returned something unusable."""


class EngineUnavailableError(KaLMEngineError):
    """The engine is starting, stopped or dead; the request may be retried,
    after ``retry_after`` seconds when that is known to help (starting,
    draining)."""

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OverloadedError(KaLMEngineError):
    """Too many requests are in flight; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class KaLMHTTPError(KaLMError, RuntimeError):
    """The server answered with a non-2xx status."""

    def __init__(self, status: int, message: str, *, url: str = "") -> None:
        super().__init__(f"HTTP {status} from {url}: {message}" if url else message)
        self.status = status
        self.message = message
        self.url = url
