# SPDX-License-Identifier: Apache-2.0
"""The HTTP/1.1 layer under the app: uvicorn's h11 protocol, bounded.

A server exposed without a proxy in front needs what uvicorn leaves open: a
cap on the request line plus headers (h11's ``max_incomplete_event_size``;
httptools has none, so h11 is used), and a deadline for a request to arrive
in full, so that a client sending a byte a second (slowloris) or stalling
mid-body is cut off instead of holding its connection forever. Errors
answered here, before any request reaches the app, carry the same JSON body
as every other error (``server/errors.py``).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from kalm_t5gemma2_vllm_plugin.constants import (
    DEFAULT_HTTP_KEEP_ALIVE,
    DEFAULT_HTTP_MAX_HEADER_BYTES,
    DEFAULT_HTTP_READ_TIMEOUT,
)
from kalm_t5gemma2_vllm_plugin.server.errors import json_error_bytes

__all__ = ["GuardedH11Protocol", "uvicorn_options"]

# The client has sent its whole request (or can send no more).
_REQUEST_READ = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a read deadline and JSON errors."""

    #: Set per server by ``uvicorn_options``.
    read_timeout: float = DEFAULT_HTTP_READ_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    # The deadline runs from the connection's start, and from the end of each
    # answer, until the next request has arrived in full.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            self._head_refused()
            return
        super().data_received(data)
        if self.conn.their_state in _REQUEST_READ:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state not in (
            _REQUEST_READ
        ):
            self._arm()

    def _head_too_large(self, data: bytes) -> bool:
        """h11 checks its limit only while a head is incomplete, so a large
        head that arrives in one read would pass: measure it here."""
        limit = self.config.h11_max_incomplete_event_size
        if limit is None:
            return False
        joined = self.conn.trailing_data[0] + data  # a head so far: small
        end = joined.find(b"\r\n\r\n")
        return (len(joined) if end < 0 else end + 4) > limit

    def _head_refused(self) -> None:
        self._send_error(
            431,
            "headers_too_large",
            f"The request line and headers exceed "
            f"{self.config.h11_max_incomplete_event_size} bytes.",
        )

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes h11 refuses, in JSON; 431 when what
        overflowed is the request line and headers."""
        limit = self.config.h11_max_incomplete_event_size
        if limit is not None and len(self.conn.trailing_data[0]) > limit:
            self._head_refused()
        else:
            self._send_error(
                400,
                "invalid_http",
                "Invalid HTTP request: the request line, a header or the body's "
                "framing is not valid HTTP/1.1.",
            )

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.close()  # an answer was given; the rest never came
            return
        if self.conn.our_state is h11.SEND_RESPONSE:
            # The app has the head and waits for the body: it sees a disconnect.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.logger.info(  # not a warning: a slowloris flood would flood the log
            "Closed a connection whose request took over %g s to arrive.",
            self.read_timeout,
        )
        self._send_error(
            408,
            "request_timeout",
            f"The request did not arrive in full within {self.read_timeout:g} s.",
        )

    def _send_error(self, status: int, type_: str, message: str) -> None:
        body = json_error_bytes(type_, message)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"x-request-id", uuid.uuid4().hex.encode()),
        ]
        try:
            for event in (
                h11.Response(
                    status_code=status, headers=headers, reason=STATUS_PHRASES[status]
                ),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event) or b"")
        except h11.LocalProtocolError:
            pass  # no answer fits the connection's state; closing says enough
        self.transport.close()


def uvicorn_options(
    *,
    read_timeout: float = DEFAULT_HTTP_READ_TIMEOUT,
    max_header_bytes: int = DEFAULT_HTTP_MAX_HEADER_BYTES,
    keep_alive: int = DEFAULT_HTTP_KEEP_ALIVE,
) -> dict[str, Any]:
    """``uvicorn.Config`` keywords for this protocol with these limits.

    Example:
        >>> config = uvicorn.Config(app, port=8000, **uvicorn_options(read_timeout=30))
    """
    protocol = type(
        "GuardedH11Protocol", (GuardedH11Protocol,), {"read_timeout": read_timeout}
    )
    return {
        "http": protocol,
        "h11_max_incomplete_event_size": max_header_bytes,
        "timeout_keep_alive": keep_alive,
    }
