# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-rerank``: offline reranking of JSONL files (or the built-in sample).

Input rows are ``{"query", "document", "id"?, "instruction"?}``; output rows are
``{"id", "query", "document", "score"[, "margin"][, "instruction"]}`` in input
order (or the best ``--top-k`` per query). The file is streamed batch by batch,
so it may be far larger than memory.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .constants import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DOCUMENT_MAX_LENGTH,
    DEFAULT_ENCODER_CHUNK_SIZE,
    DEFAULT_INSTRUCTION,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_QUERY_MAX_LENGTH,
    MODEL_ID,
    SAMPLE_DOCUMENTS,
    SAMPLE_QUERY,
)
from .errors import KaLMConfigError, KaLMError

__all__ = [
    "add_engine_arguments",
    "configure_vllm_environment",
    "main",
    "reranker_kwargs",
    "resolve_cli_model",
]

# Rows scored per engine call while streaming; vLLM batches within each call.
_ROWS_PER_CALL = 2048


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


def configure_vllm_environment(
    *, log_level: str = "WARNING", in_process: bool = False
) -> None:
    """Defaults for vLLM's environment, set before vLLM is imported.

    Logs go to stderr (stdout carries results), no usage statistics are sent,
    and the offline CLI runs the engine in-process (seconds instead of tens of
    seconds to start). Variables the user set win.
    """
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", log_level.upper())
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if in_process:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def resolve_cli_model(model: str | None) -> tuple[str, str]:
    """``(name, local path)`` of the model to load.

    An explicit ``--model`` that cannot be loaded is an error. The default model
    falls back, saying so, to a random checkpoint generated locally, so the
    command still runs end to end offline.
    """
    from .hub import resolve_model

    if model is not None:
        return model, resolve_model(model)
    try:
        return MODEL_ID, resolve_model(MODEL_ID)
    except KaLMConfigError as exc:
        from .testing import make_checkpoint

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


@dataclass
class _Row:
    index: int
    id: Any
    query: str
    document: str
    instruction: str | None


class InputError(ValueError):
    """A malformed input row; the message starts with ``path:line:``."""


def _parse_row(line: str, where: str, index: int) -> _Row:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise InputError(
            f"{where}: a row must be a JSON object, got {type(data).__name__}"
        )
    for key in ("query", "document"):
        if not isinstance(data.get(key), str):
            raise InputError(f"{where}: field {key!r} must be a string")
    instruction = data.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise InputError(f"{where}: field 'instruction' must be a string or null")
    return _Row(
        index, data.get("id", index), data["query"], data["document"], instruction
    )


def _read_rows(stream: IO[str], name: str) -> Iterator[_Row | InputError]:
    """Rows in file order; a malformed one is yielded as its error."""
    index = 0
    for line_number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            yield _parse_row(line, f"{name}:{line_number}", index)
        except InputError as exc:
            yield exc
        index += 1


def _score_rows(
    reranker: Any, rows: list[_Row], return_margin: bool
) -> list[tuple[float, dict[str, Any]]]:
    """``(margin, output record)`` per row, in row order."""
    margins: dict[int, float] = {}
    groups: dict[str | None, list[_Row]] = {}
    for row in rows:
        groups.setdefault(row.instruction, []).append(row)
    for instruction, group in groups.items():
        values = reranker.margins(
            [(r.query, r.document) for r in group], instruction=instruction
        )
        margins.update((r.index, m) for r, m in zip(group, values, strict=True))
    from .scores import score_from_margin

    out = []
    for row in rows:
        margin = margins[row.index]
        record: dict[str, Any] = {
            "id": row.id,
            "query": row.query,
            "document": row.document,
            "score": score_from_margin(margin),
        }
        if return_margin:
            record["margin"] = margin
        if row.instruction is not None:
            record["instruction"] = row.instruction
        out.append((margin, record))
    return out


def _top_k_per_query(
    scored: Iterable[tuple[float, dict[str, Any]]], k: int
) -> list[tuple[float, dict[str, Any]]]:
    """Best ``k`` per query (queries in first-seen order), margin descending,
    ties by input order."""
    heaps: dict[str, list[tuple[float, int, dict[str, Any]]]] = {}
    for position, (margin, record) in enumerate(scored):
        heap = heaps.setdefault(record["query"], [])
        item = (margin, -position, record)  # min-heap of the k best
        if len(heap) < k:
            heapq.heappush(heap, item)
        elif k and item[:2] > heap[0][:2]:
            heapq.heapreplace(heap, item)
    return [
        (item[0], item[2])
        for heap in heaps.values()
        for item in sorted(heap, key=lambda t: t[:2], reverse=True)
    ]


def _write(out: IO[str], record: dict[str, Any]) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _rank_sample(reranker: Any, args: argparse.Namespace, out: IO[str]) -> None:
    results = reranker.rank(
        SAMPLE_QUERY,
        list(SAMPLE_DOCUMENTS),
        top_k=args.top_k,
        return_margin=args.return_margin,
    )
    for rank, result in enumerate(results, start=1):
        record = {
            "rank": rank,
            "query": SAMPLE_QUERY,
            "document": SAMPLE_DOCUMENTS[result["corpus_id"]],
            **result,
        }
        _write(out, record)


def _rerank_file(reranker: Any, args: argparse.Namespace, out: IO[str]) -> int:
    from tqdm import tqdm

    name = "<stdin>" if args.input_jsonl == "-" else args.input_jsonl
    stream = (
        sys.stdin
        if args.input_jsonl == "-"
        else open(  # noqa: SIM115
            args.input_jsonl, encoding="utf-8"
        )
    )
    progress = tqdm(unit=" rows", disable=not sys.stderr.isatty(), file=sys.stderr)
    kept: list[tuple[float, dict[str, Any]]] = []
    skipped: list[InputError] = []
    error: InputError | None = None
    try:
        items = _read_rows(stream, name)
        while error is None and (
            chunk := list(itertools.islice(items, _ROWS_PER_CALL))
        ):
            batch: list[_Row] = []
            for item in chunk:
                if isinstance(item, _Row):
                    batch.append(item)
                elif args.skip_invalid:
                    skipped.append(item)
                else:  # score what came before it, then stop
                    error = item
                    break
            scored = _score_rows(reranker, batch, args.return_margin)
            if args.top_k is None:
                for _, record in scored:
                    _write(out, record)
            else:
                kept = _top_k_per_query(itertools.chain(kept, scored), args.top_k)
            progress.update(len(batch))
    finally:
        progress.close()
        if stream is not sys.stdin:
            stream.close()
    if error is not None:
        raise error
    for _, record in kept:
        _write(out, record)
    if skipped:
        print(
            f"Skipped {len(skipped)} invalid row(s); first: {skipped[0]}",
            file=sys.stderr,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kalm-vllm-rerank``."""
    parser = argparse.ArgumentParser(
        prog="kalm-vllm-rerank",
        description="Score (query, document) pairs with KaLM-Reranker-V1 on vLLM. "
        "Without --input-jsonl, ranks the built-in sample.",
    )
    parser.add_argument(
        "--input-jsonl", help="rows {query, document, id?, instruction?}; '-' for stdin"
    )
    parser.add_argument("--output-jsonl", help="output file (default stdout)")
    parser.add_argument(
        "--top-k", type=int, default=None, help="keep the best K rows per query"
    )
    parser.add_argument(
        "--return-margin",
        action="store_true",
        help="also output margin = yes_logit - no_logit",
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip malformed rows (and report how many) instead of stopping",
    )
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    if args.top_k is not None and args.top_k < 0:
        parser.error("--top-k must be >= 0")

    configure_vllm_environment(in_process=True)
    out: IO[str] = sys.stdout
    try:
        _, model = resolve_cli_model(args.model)
        from .reranker import KaLMVLLMReranker

        if args.output_jsonl:
            Path(args.output_jsonl).parent.mkdir(parents=True, exist_ok=True)
            out = open(args.output_jsonl, "w", encoding="utf-8")  # noqa: SIM115
        with KaLMVLLMReranker(model, **reranker_kwargs(args)) as reranker:
            print(
                f"KaLM reranker on vLLM: model={model} dtype={reranker.dtype} "
                f"encoder_chunk_size={args.encoder_chunk_size}",
                file=sys.stderr,
            )
            if args.input_jsonl is None:
                _rank_sample(reranker, args, out)
                return 0
            return _rerank_file(reranker, args, out)
    except (InputError, KaLMError, OSError) as exc:
        print(f"kalm-vllm-rerank: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if out is not sys.stdout:
            out.close()
