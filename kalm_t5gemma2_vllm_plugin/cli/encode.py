# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-encode``: encode a corpus once into a passage store."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kalm_t5gemma2_vllm_plugin.constants import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DOCUMENT_MAX_LENGTH,
    DEFAULT_ENCODER_CHUNK_SIZE,
)
from kalm_t5gemma2_vllm_plugin.errors import KaLMError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kalm-vllm-encode``."""
    parser = argparse.ArgumentParser(
        prog="kalm-vllm-encode",
        description="Encode documents once into a passage store for reranking by id.",
    )
    parser.add_argument("--model", required=True, help="Hub id or local checkpoint")
    parser.add_argument(
        "--input", required=True, type=Path, help='JSONL rows {"id": str, "text": str}'
    )
    parser.add_argument("--store", required=True, type=Path, help="store directory")
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
    args = parser.parse_args(argv)

    from kalm_t5gemma2_vllm_plugin.checkpoints.hub import resolve_model
    from kalm_t5gemma2_vllm_plugin.engine.session import default_dtype
    from kalm_t5gemma2_vllm_plugin.store.encoder import PassageEncoder, encode_corpus
    from kalm_t5gemma2_vllm_plugin.store.format import StoreIdentity
    from kalm_t5gemma2_vllm_plugin.validation import (
        check_positive_int,
        parse_chunk_size,
        parse_dtype,
    )

    try:
        chunk = parse_chunk_size(args.encoder_chunk_size, "--encoder-chunk-size")
        check_positive_int(args.document_max_length, "--document-max-length")
        check_positive_int(args.batch_size, "--batch-size")
        dtype = parse_dtype(args.dtype, "--dtype") or default_dtype()
        model_path = resolve_model(args.model)
        identity = StoreIdentity.for_engine(
            model_path, chunk, args.document_max_length, dtype
        )
        encoder = PassageEncoder(
            model_path,
            chunk_size=chunk,
            dtype=dtype,
            document_max_length=args.document_max_length,
        )
        counts = encode_corpus(
            encoder,
            args.input,
            args.store,
            identity=identity,
            batch_size=args.batch_size,
            progress=sys.stderr.isatty(),
        )
    except (KaLMError, OSError) as exc:
        print(f"kalm-vllm-encode: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({**counts, "store": str(args.store)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
