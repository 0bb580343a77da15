# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-serve``: the HTTP service (``server/``) on uvicorn.

Exit codes: 0 after a clean stop, 1 if the engine failed to start, 2 for bad
flags, 3 after a stop that cut requests at ``--shutdown-timeout``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from kalm_t5gemma2_vllm_plugin.cli.common import (
    add_engine_arguments,
    configure_vllm_environment,
    engine_options,
    flag_error,
    resolve_cli_model,
)
from kalm_t5gemma2_vllm_plugin.constants import (
    DEFAULT_HTTP_KEEP_ALIVE,
    DEFAULT_HTTP_MAX_HEADER_BYTES,
    DEFAULT_HTTP_READ_TIMEOUT,
    ENV_API_KEY,
)
from kalm_t5gemma2_vllm_plugin.errors import KaLMError, KaLMInputError
from kalm_t5gemma2_vllm_plugin.validation import check_positive_int
from kalm_t5gemma2_vllm_plugin.windows import DEFAULT_MAX_WINDOWS

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kalm-vllm-serve",
        description="Serve KaLM-Reranker-V1 over HTTP (/rerank, /score, /v1/rerank, "
        "/v2/rerank, /health, /metrics, /docs) on vLLM's asynchronous engine.",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default loopback; 0.0.0.0 to expose)",
    )
    parser.add_argument("--port", type=int, default=8000)
    add_engine_arguments(parser)
    parser.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        help="name clients may send as 'model' (repeatable); default: "
        "the --model value and its last path component",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(ENV_API_KEY),
        help=f"require 'Authorization: Bearer KEY' on every route but "
        f"/health (default: ${ENV_API_KEY})",
    )
    parser.add_argument(
        "--passage-store",
        help="a store written by kalm-vllm-encode: requests may give "
        "documents by id (document_ids)",
    )
    parser.add_argument(
        "--decoder-only",
        action="store_true",
        help="load no encoder (needs --passage-store): only stored "
        "documents are scored, nothing is encoded online",
    )
    limits = parser.add_argument_group("request limits")
    limits.add_argument(
        "--max-documents", type=int, default=4096, help="documents per rerank request"
    )
    limits.add_argument(
        "--max-pairs",
        type=int,
        default=4096,
        help="pairs per request; each window of a long document is a pair",
    )
    limits.add_argument(
        "--max-windows-per-document",
        type=int,
        default=DEFAULT_MAX_WINDOWS,
        help="windows of one document (long_document max/mean): 413 beyond it",
    )
    limits.add_argument(
        "--max-body-mb", type=float, default=32.0, help="request body size in MiB"
    )
    limits.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=64,
        help="requests in flight before new ones get 429",
    )
    limits.add_argument(
        "--max-request-tokens",
        type=int,
        default=None,
        help="tokens per request (as usage.prompt_tokens counts them), checked "
        "while tokenizing: 413 beyond it (default: what --max-documents/"
        "--max-pairs full-length pairs need)",
    )
    parser.add_argument(
        "--allowed-origins",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="browser origins CORS admits (repeatable or comma-separated; '*' "
        "for any); default: none, CORS off",
    )
    http = parser.add_argument_group("HTTP connection limits")
    http.add_argument(
        "--h11-max-incomplete-event-size",
        type=int,
        default=DEFAULT_HTTP_MAX_HEADER_BYTES,
        metavar="BYTES",
        help="largest request line plus headers; 431 beyond it (default "
        f"{DEFAULT_HTTP_MAX_HEADER_BYTES})",
    )
    http.add_argument(
        "--request-read-timeout",
        type=float,
        default=DEFAULT_HTTP_READ_TIMEOUT,
        metavar="S",
        help="seconds a request (headers and body) may take to arrive; then 408 "
        f"and the connection is closed (default {DEFAULT_HTTP_READ_TIMEOUT:g})",
    )
    http.add_argument(
        "--timeout-keep-alive",
        type=int,
        default=DEFAULT_HTTP_KEEP_ALIVE,
        metavar="S",
        help=f"seconds an idle keep-alive connection stays open (default "
        f"{DEFAULT_HTTP_KEEP_ALIVE})",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM/SIGINT, seconds in-flight requests may finish in; the "
        "rest get 503 and the exit code is 3 (default 30)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kalm-vllm-serve``."""
    args = _parser().parse_args(argv)
    configure_vllm_environment(log_level=args.log_level)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import uvicorn

    from kalm_t5gemma2_vllm_plugin.server import create_app
    from kalm_t5gemma2_vllm_plugin.server.protocol import uvicorn_options
    from kalm_t5gemma2_vllm_plugin.server.service import ServiceConfig

    try:
        if args.decoder_only and not args.passage_store:
            raise KaLMInputError("--decoder-only needs --passage-store.")
        for name in (
            "max_documents",
            "max_pairs",
            "max_windows_per_document",
            "max_concurrent_requests",
            "h11_max_incomplete_event_size",
            "timeout_keep_alive",
        ):
            check_positive_int(getattr(args, name), f"--{name.replace('_', '-')}")
        if not (
            math.isfinite(args.request_read_timeout) and args.request_read_timeout > 0
        ):
            raise KaLMInputError(
                f"--request-read-timeout must be a number of seconds > 0, got "
                f"{args.request_read_timeout}.",
                field="--request-read-timeout",
            )
        if args.max_request_tokens is not None:
            check_positive_int(args.max_request_tokens, "--max-request-tokens")
        if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
            raise KaLMInputError(
                f"--shutdown-timeout must be a number of seconds >= 0, got "
                f"{args.shutdown_timeout}.",
                field="--shutdown-timeout",
            )
        model, model_path = resolve_cli_model(args.model)
        config = ServiceConfig(
            engine=engine_options(
                args, model, model_path, passage_store=args.passage_store
            ),
            served_model_names=args.served_model_name or [],
            api_key=args.api_key or None,
            max_documents=args.max_documents,
            max_pairs=args.max_pairs,
            max_windows_per_document=args.max_windows_per_document,
            max_body_bytes=int(args.max_body_mb * 1024 * 1024),
            max_concurrent_requests=args.max_concurrent_requests,
            max_request_tokens=args.max_request_tokens,
            shutdown_timeout=args.shutdown_timeout,
            allowed_origins=_origins(args.allowed_origins),
        )
    except KaLMError as exc:
        print(f"kalm-vllm-serve: error: {flag_error(exc)}", file=sys.stderr)
        return 2

    app = create_app(config)
    server = _server_class(uvicorn.Server)(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            # Only what the drain left: answers being written, idle connections.
            timeout_graceful_shutdown=5,
            **uvicorn_options(
                read_timeout=args.request_read_timeout,
                max_header_bytes=args.h11_max_incomplete_event_size,
                keep_alive=args.timeout_keep_alive,
            ),
        ),
        app.state.drain,
    )
    app.state.request_shutdown = lambda: setattr(server, "should_exit", True)
    print(
        f"=== KaLM vLLM Online Reranker ===\nmodel: {config.model}\n"
        f"query_max_length={config.engine.settings.query_max_length} "
        f"document_max_length={config.engine.settings.document_max_length} "
        f"encoder_chunk_size={config.engine.settings.chunk_size} "
        f"max_model_len={config.engine.max_model_len or 'derived'}"
        f"\nauth: {'on' if config.api_key else 'off'}"
        f" cors: {','.join(config.allowed_origins) or 'off'}\n"
        f"listen: http://{args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    server.run()
    if app.state.start_failed:
        return 1
    return 3 if app.state.drain.dropped else 0


def _origins(given: list[str] | None) -> list[str]:
    return [o.strip() for arg in given or [] for o in arg.split(",") if o.strip()]


def _server_class(base: type) -> type:
    """uvicorn's ``Server``, stopping through the app's ``Drain``: a signal
    drains (bounded by --shutdown-timeout), a second one cuts at once, and the
    process exits when the drain is done (with the signal not re-raised, so the
    exit code says whether requests were cut)."""

    class DrainingServer(base):  # type: ignore[valid-type,misc]
        def __init__(self, config: Any, drain: Any) -> None:
            super().__init__(config)
            self.drain = drain
            self.signals = self.handled = 0

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            self.signals += 1  # a signal handler: the loop acts on it (on_tick)

        async def on_tick(self, counter: int) -> bool:
            while self.handled < self.signals:
                self.handled += 1
                self.drain.stop()
            if self.drain.done:
                return True
            return bool(await super().on_tick(counter))

    return DrainingServer


if __name__ == "__main__":
    sys.exit(main())
