# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-encode``: encode a corpus once into a passage store."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kalm_t5gemma2_vllm_plugin.constants import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DOCUMENT_MAX_LENGTH,
    DEFAULT_ENCODER_CHUNK_SIZE,
)
from kalm_t5gemma2_vllm_plugin.errors import KaLMError, KaLMInputError
from kalm_t5gemma2_vllm_plugin.windows import (
    DEFAULT_MAX_WINDOWS,
    DEFAULT_WINDOW_OVERLAP,
    LONG_DOCUMENT_POLICIES,
    check_window_overlap,
)

if TYPE_CHECKING:
    from kalm_t5gemma2_vllm_plugin.store.format import StoreIdentity

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kalm-vllm-encode``."""
    from kalm_t5gemma2_vllm_plugin.cli.common import add_store_option_argument

    parser = argparse.ArgumentParser(
        prog="kalm-vllm-encode",
        description="Encode documents once into a passage store for reranking by id.",
    )
    parser.add_argument("--model", required=True, help="Hub id or local checkpoint")
    parser.add_argument(
        "--input",
        required=True,
        help='JSONL rows {"id": str, "text": str} (with --ray also Parquet, s3://)',
    )
    parser.add_argument(
        "--store",
        required=True,
        help="store directory, or a Lance store: a path ending in .lance or an "
        "object store URI (s3://bucket/store.lance)",
    )
    add_store_option_argument(parser)
    parser.add_argument("--encoder-chunk-size", default=str(DEFAULT_ENCODER_CHUNK_SIZE))
    parser.add_argument(
        "--document-max-length", type=int, default=DEFAULT_DOCUMENT_MAX_LENGTH
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="passages per encoder pass and per durable commit",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="dtype of the stored states; must match the serving "
        "engine's (default: bf16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument(
        "--long-document",
        choices=LONG_DOCUMENT_POLICIES,
        default="truncate",
        help="truncate: store each document's head; max or mean: store a long "
        "document as its windows (the same for both: the policy applies when "
        "ranking by id)",
    )
    parser.add_argument(
        "--window-overlap",
        type=int,
        default=DEFAULT_WINDOW_OVERLAP,
        help="tokens shared by neighbouring windows (at most a quarter of one)",
    )
    parser.add_argument(
        "--max-windows-per-document",
        type=int,
        default=DEFAULT_MAX_WINDOWS,
        help="a document needing more windows stops the run, naming its line",
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="leave malformed rows out (and report how many) instead of stopping",
    )
    ray = parser.add_argument_group("distributed encoding (the 'ray' extra)")
    ray.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="encode on Ray into a Lance store: the cluster's address ('auto', "
        "ray://host:10001), or none to start a local instance",
    )
    ray.add_argument(
        "--commit-every",
        type=int,
        default=10_000,
        help="with --ray: documents per Lance commit (a killed run resumes "
        "after the last one)",
    )
    ray.add_argument(
        "--ray-workers",
        type=int,
        default=None,
        help="with --ray: CPU encoder actors (default: one per GPU, else the "
        "cluster's CPUs / 4); each uses its share of the CPUs as threads",
    )
    args = parser.parse_args(argv)

    from kalm_t5gemma2_vllm_plugin.checkpoints.hub import resolve_model
    from kalm_t5gemma2_vllm_plugin.cli.common import Output, flush_stdout
    from kalm_t5gemma2_vllm_plugin.engine.session import default_dtype
    from kalm_t5gemma2_vllm_plugin.store.encoder import PassageEncoder, encode_corpus
    from kalm_t5gemma2_vllm_plugin.store.format import StoreIdentity
    from kalm_t5gemma2_vllm_plugin.store.uri import parse_store_options
    from kalm_t5gemma2_vllm_plugin.validation import (
        check_positive_int,
        parse_chunk_size,
        parse_dtype,
    )

    invalid: list[KaLMInputError] | None = [] if args.skip_invalid else None
    try:
        chunk = parse_chunk_size(args.encoder_chunk_size, "--encoder-chunk-size")
        check_positive_int(args.document_max_length, "--document-max-length")
        check_positive_int(args.batch_size, "--batch-size")
        check_window_overlap(args.window_overlap, "--window-overlap")
        check_positive_int(args.max_windows_per_document, "--max-windows-per-document")
        dtype = parse_dtype(args.dtype, "--dtype") or default_dtype()
        args.store_options = parse_store_options(args.store_option, "--store-option")
        model_path = resolve_model(args.model)
        identity = StoreIdentity.for_engine(
            model_path, chunk, args.document_max_length, dtype
        )
        if args.ray is not None:
            counts = _encode_on_ray(args, model_path, identity, chunk, dtype, invalid)
        else:
            encoder = PassageEncoder(
                model_path,
                chunk_size=chunk,
                dtype=dtype,
                document_max_length=args.document_max_length,
            )
            with _store_errors(args.store):
                counts = encode_corpus(
                    encoder,
                    Path(args.input),
                    args.store,
                    identity=identity,
                    batch_size=args.batch_size,
                    progress=sys.stderr.isatty(),
                    invalid=invalid,
                    long_document=args.long_document,
                    window_overlap=args.window_overlap,
                    max_windows=args.max_windows_per_document,
                    storage_options=args.store_options,
                )
        if invalid:
            print(
                f"Skipped {len(invalid)} invalid row(s); first: {invalid[0]}",
                file=sys.stderr,
            )
        skipped = {} if invalid is None else {"invalid": len(invalid)}
        summary = json.dumps({**counts, **skipped, "store": str(args.store)})
        Output(sys.stdout, "stdout").write(summary + "\n")
        flush_stdout()
    except (KaLMError, OSError) as exc:
        print(f"kalm-vllm-encode: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _encode_on_ray(
    args: argparse.Namespace,
    model_path: str,
    identity: StoreIdentity,
    chunk: int | None,
    dtype: str,
    invalid: list[KaLMInputError] | None,
) -> dict[str, int]:
    from kalm_t5gemma2_vllm_plugin.store.ray_encode import encode_corpus_ray
    from kalm_t5gemma2_vllm_plugin.validation import check_positive_int

    check_positive_int(args.commit_every, "--commit-every")
    if args.ray_workers is not None:
        check_positive_int(args.ray_workers, "--ray-workers")
    return encode_corpus_ray(
        args.ray or None,
        model_path,
        args.input,
        str(args.store),
        identity=identity,
        chunk_size=chunk,
        document_max_length=args.document_max_length,
        dtype=dtype,
        batch_size=args.batch_size,
        commit_every=args.commit_every,
        workers=args.ray_workers,
        long_document=args.long_document,
        window_overlap=args.window_overlap,
        max_windows=args.max_windows_per_document,
        storage_options=args.store_options,
        invalid=invalid,
    )


@contextlib.contextmanager
def _store_errors(store: str) -> Iterator[None]:
    """A store that cannot be written (a full disk) is one line naming it."""
    from safetensors import SafetensorError

    kept = "; the passages committed before it are kept, and a re-run completes them"
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise KaLMError(
            f"--store {store}: could not write ({exc.strerror}){kept}"
        ) from None
    except SafetensorError as exc:  # writing a shard
        raise KaLMError(
            f"--store {store}: could not write a shard ({exc}){kept}"
        ) from None
    except sqlite3.Error as exc:  # the index; SQLite says "disk I/O error"
        raise KaLMError(f"--store {store}: the index failed ({exc}){kept}") from None


if __name__ == "__main__":
    sys.exit(main())
