# SPDX-License-Identifier: Apache-2.0
"""What the console scripts that start an engine share: engine flags, the
model fallback, and the flag names of engine options."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from kalm_t5gemma2_vllm_plugin.constants import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DOCUMENT_MAX_LENGTH,
    DEFAULT_ENCODER_CHUNK_SIZE,
    DEFAULT_INSTRUCTION,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_QUERY_MAX_LENGTH,
    MODEL_ID,
)
from kalm_t5gemma2_vllm_plugin.engine.vllm_compat import configure_vllm_environment
from kalm_t5gemma2_vllm_plugin.errors import KaLMConfigError

__all__ = [
    "add_engine_arguments",
    "configure_vllm_environment",
    "flag_error",
    "resolve_cli_model",
    "reranker_kwargs",
]

#: Option field -> the flag that sets it, for messages (one table for every CLI).
FLAGS = {
    "encoder_chunk_size": "--encoder-chunk-size",
    "document_max_length": "--document-max-length",
    "query_max_length": "--query-max-length",
    "max_model_len": "--max-model-len",
    "batch_size": "--batch-size",
    "dtype": "--dtype",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "instruction": "--instruction",
    "decoder_only": "--decoder-only",
}


def flag_error(error: Exception) -> str:
    """An option error's message in the CLI's words (flag names, not fields)."""
    message = str(error)
    field = getattr(error, "field", None)
    if field in FLAGS and message.startswith(field):
        return FLAGS[field] + message[len(field) :]
    return message


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
    group.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN)
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
        "--instruction", default=DEFAULT_INSTRUCTION, help="default task instruction"
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


def reranker_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        query_max_length=args.query_max_length,
        document_max_length=args.document_max_length,
        encoder_chunk_size=args.encoder_chunk_size,
        max_model_len=args.max_model_len,
        batch_size=args.batch_size,
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        instruction=args.instruction,
    )
