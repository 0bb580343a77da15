# SPDX-License-Identifier: Apache-2.0
"""What the console scripts that start an engine share: engine flags, the
model fallback, the flag names of engine options, and where results go."""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from kalm_t5gemma2_vllm_plugin.constants import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DOCUMENT_MAX_LENGTH,
    DEFAULT_ENCODER_CHUNK_SIZE,
    DEFAULT_INSTRUCTION,
    DEFAULT_PASSAGE_CACHE_MB,
    DEFAULT_QUERY_MAX_LENGTH,
    DEFAULT_STORE_REFRESH_S,
    MODEL_ID,
)
from kalm_t5gemma2_vllm_plugin.engine.vllm_compat import configure_vllm_environment
from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError, KaLMError

if TYPE_CHECKING:  # the engine tier loads only when a command starts one
    from kalm_t5gemma2_vllm_plugin.engine.session import EngineOptions

__all__ = [
    "Output",
    "add_engine_arguments",
    "add_long_document_arguments",
    "add_store_option_argument",
    "store_options",
    "configure_vllm_environment",
    "flag_error",
    "flush_stdout",
    "open_output",
    "resolve_cli_model",
    "reranker_kwargs",
]

#: Option field -> the flag that sets it, for messages (one table for every CLI).
FLAGS = {
    "encoder_chunk_size": "--encoder-chunk-size",
    "document_max_length": "--document-max-length",
    "query_max_length": "--query-max-length",
    "max_model_len": "--max-model-len",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "batch_size": "--batch-size",
    "dtype": "--dtype",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "instruction": "--instruction",
    "decoder_only": "--decoder-only",
    "passage_cache_mb": "--passage-cache-mb",
}


def flag_error(error: Exception) -> str:
    """An option error's message in the CLI's words (flag names, not fields)."""
    message = str(error)
    field = getattr(error, "field", None)
    if field in FLAGS and message.startswith(field):
        return FLAGS[field] + message[len(field) :]
    return message


def add_long_document_arguments(parser: argparse.ArgumentParser) -> None:
    """``--long-document`` and its window flags (``windows.py``)."""
    from kalm_t5gemma2_vllm_plugin.windows import (
        DEFAULT_MAX_WINDOWS,
        DEFAULT_WINDOW_OVERLAP,
        LONG_DOCUMENT_POLICIES,
    )

    group = parser.add_argument_group("long documents")
    group.add_argument(
        "--long-document",
        choices=LONG_DOCUMENT_POLICIES,
        default="truncate",
        help="a document longer than --document-max-length: keep its head "
        "(truncate), or score its windows and keep the best (max) or the mean",
    )
    group.add_argument(
        "--window-overlap",
        type=int,
        default=DEFAULT_WINDOW_OVERLAP,
        help="tokens shared by neighbouring windows (at most a quarter of one)",
    )
    group.add_argument(
        "--max-windows-per-document",
        type=int,
        default=DEFAULT_MAX_WINDOWS,
        help="more windows than this is an error naming the document",
    )


def add_store_option_argument(parser: argparse._ActionsContainer) -> None:
    """``--store-option KEY=VALUE`` (repeatable): a Lance storage option,
    merged over those from the environment (``store/uri.py``)."""
    parser.add_argument(
        "--store-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a storage option for a Lance passage store (repeatable), e.g. "
        "aws_endpoint=http://127.0.0.1:9000; merged over AWS_ENDPOINT_URL, "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP",
    )


def store_options(args: argparse.Namespace) -> dict[str, str]:
    """``--store-option`` values as a dict (later ones win)."""
    from kalm_t5gemma2_vllm_plugin.store.uri import parse_store_options

    return parse_store_options(getattr(args, "store_option", None), "--store-option")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine flags shared by ``kalm-vllm-rerank`` and ``kalm-vllm-serve``."""
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--model",
        default=None,
        help=f"Hub id or local checkpoint directory (default {MODEL_ID})",
    )
    group.add_argument("--query-max-length", type=int, default=DEFAULT_QUERY_MAX_LENGTH)
    group.add_argument(
        "--document-max-length", type=int, default=DEFAULT_DOCUMENT_MAX_LENGTH
    )
    group.add_argument(
        "--encoder-chunk-size",
        default=str(DEFAULT_ENCODER_CHUNK_SIZE),
        help="pooling factor 1, 2, 4, 8, 16, 32, or none",
    )
    group.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest request (default: a full-length query and document)",
    )
    group.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="vLLM's token budget per step (default: derived; >= max-model-len)",
    )
    group.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="most requests per engine step",
    )
    group.add_argument(
        "--dtype",
        default=None,
        help="bfloat16, float16 or float32 (default: bf16 on CUDA, fp32 on CPU)",
    )
    group.add_argument("--gpu-memory-utilization", type=float, default=None)
    group.add_argument(
        "--passage-cache-mb",
        type=float,
        default=DEFAULT_PASSAGE_CACHE_MB,
        help="the plugin's passage-state cache in the engine, MiB (0: off; "
        f"default {DEFAULT_PASSAGE_CACHE_MB:g})",
    )
    group.add_argument(
        "--instruction", default=DEFAULT_INSTRUCTION, help="default task instruction"
    )
    add_store_option_argument(group)
    group.add_argument(
        "--store-refresh-s",
        type=float,
        default=DEFAULT_STORE_REFRESH_S,
        help="a Lance passage store's newest version is picked up this often "
        "(seconds; the staleness bound of appended passages); 0: every request",
    )


def resolve_cli_model(model: str | None) -> tuple[str, str]:
    """``(name, local path)`` of the model to load.

    An explicit ``--model`` that cannot be loaded is an error. The default model
    falls back, saying so, to a random checkpoint generated locally, so the
    command still runs end to end offline.
    """
    from kalm_t5gemma2_vllm_plugin.checkpoints.hub import resolve_model

    if model is not None:
        return model, resolve_model(model)
    try:
        return MODEL_ID, resolve_model(MODEL_ID)
    except KaLMConfigError as exc:
        from kalm_t5gemma2_vllm_plugin.checkpoints.synthetic import make_checkpoint

        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        path = cache / "kalm_t5gemma2_vllm_plugin" / "fallback-tiny-seed0"
        print(f"{exc}", file=sys.stderr)
        if not (path / "model.safetensors").is_file():
            make_checkpoint(path, "tiny", seed=0)
        print(
            f"Falling back to a locally generated random test checkpoint at {path}; "
            f"its scores are not meaningful.",
            file=sys.stderr,
        )
        return str(path), str(path)


#: Engine flags that are ``EngineOptions`` fields and reranker keywords alike.
_ENGINE_FIELDS = (
    "store_refresh_s",
    "max_model_len",
    "max_num_batched_tokens",
    "batch_size",
    "dtype",
    "gpu_memory_utilization",
    "instruction",
)
#: Engine flags that are ``EngineSettings`` fields (reranker keyword, field).
_SETTINGS_FIELDS = (
    ("query_max_length", "query_max_length"),
    ("document_max_length", "document_max_length"),
    ("encoder_chunk_size", "chunk_size"),
    ("passage_cache_mb", "passage_cache_mb"),
)


def reranker_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``KaLMVLLMReranker`` keywords from the engine flags."""
    names = [*_ENGINE_FIELDS, *(flag for flag, _ in _SETTINGS_FIELDS)]
    return {
        **{name: getattr(args, name) for name in names},
        "store_options": store_options(args),
    }


def engine_options(
    args: argparse.Namespace, model: str, model_path: str, **more: Any
) -> EngineOptions:
    """``EngineOptions`` from the engine flags (``more``: further fields)."""
    from kalm_t5gemma2_vllm_plugin.engine.session import EngineOptions
    from kalm_t5gemma2_vllm_plugin.vllm_model.config import EngineSettings

    settings = {field: getattr(args, flag) for flag, field in _SETTINGS_FIELDS}
    decoder_only = bool(getattr(args, "decoder_only", False))
    return EngineOptions(
        model=model,
        model_path=model_path,
        settings=EngineSettings(**settings, decoder_only=decoder_only),
        **{name: getattr(args, name) for name in _ENGINE_FIELDS},
        store_options=store_options(args),
        **more,
    )


# --- where results go -----------------------------------------------------------------
class Output:
    """A text stream whose write failures (a full disk) are one ``KaLMError``
    naming the flag and the file, not a traceback."""

    def __init__(self, stream: IO[str], name: str, note: str = "") -> None:
        self._stream = stream
        self.name = name
        self._note = note

    def write(self, text: str) -> None:
        try:
            self._stream.write(text)
        except OSError as exc:
            raise self.error(exc) from None

    def error(self, exc: OSError) -> KaLMError:
        if self._stream is sys.stdout:
            _silence_stdout()
        reason = exc.strerror or str(exc)
        return KaLMError(f"{self.name}: could not write ({reason}){self._note}")


def _silence_stdout() -> None:
    """After stdout failed, point it at /dev/null: Python flushes it again at
    exit, and that second failure would print a traceback-like warning (the
    recipe of the ``signal`` module's documentation for broken pipes)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def flush_stdout() -> None:
    """Flush stdout now, so that a failure is reported rather than hit at exit."""
    try:
        sys.stdout.flush()
    except OSError as exc:
        raise Output(sys.stdout, "stdout").error(exc) from None


@contextlib.contextmanager
def open_output(path: str | None, flag: str) -> Iterator[Output]:
    """Where a command writes its results: stdout, or the file ``path``.

    A regular file (or a new one) is written under a temporary name in its own
    directory and renamed onto ``path`` (symlinks resolved) only when the block
    ends normally, so a failed run never leaves a truncated output and an
    existing file stays as it was. Anything else (``/dev/stdout``, a FIFO, a
    device) is written in place. Open it before the engine starts: an
    unwritable path then fails at once.

    Example:
        >>> with open_output("out.jsonl", "--output-jsonl") as out:
        ...     out.write('{"id": 0}\\n')
        >>> Path("out.jsonl").read_text()
        '{"id": 0}\\n'
    """
    if path is None:
        yield Output(sys.stdout, "stdout")
        flush_stdout()
        return
    name = f"{flag} {path}"
    try:
        mode = os.stat(path).st_mode  # through symlinks, as open() goes
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        yield from _write_in_place(Path(path), name)
        return
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    stream = open(fd, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    note = "; no output was written" if mode is None else f"; {path} was left as it was"
    out = Output(stream, name, note)
    try:
        yield out
        try:
            stream.flush()
            os.fsync(stream.fileno())
            os.fchmod(stream.fileno(), _new_file_mode(mode))
            stream.close()
            os.replace(temporary, target)
        except OSError as exc:
            raise out.error(exc) from None
    except BaseException:
        # Closing flushes what is buffered, which fails again on a full disk.
        with contextlib.suppress(OSError):
            stream.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _write_in_place(target: Path, name: str) -> Iterator[Output]:
    stream = open(target, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    out = Output(stream, name)
    try:
        yield out
        try:
            stream.close()
        except OSError as exc:
            raise out.error(exc) from None
    finally:
        with contextlib.suppress(OSError):
            stream.close()


def _new_file_mode(existing: int | None) -> int:
    """An existing file's permissions, or what ``open(path, "w")`` would give."""
    if existing is not None:
        return stat.S_IMODE(existing)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
