# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-rerank``: offline reranking of JSONL files (or the built-in sample).

Input rows are ``{"query", "document", "id"?, "instruction"?}``; output rows are
``{"id", "query", "document", "score"[, "margin"][, "instruction"]}`` in input
order (or the best ``--top-k`` per query). The file is streamed batch by batch,
so it may be far larger than memory. A line that is not a valid row (bad JSON,
bytes that are not UTF-8, a lone surrogate, ...) stops the run after the rows
before it, or is skipped with ``--skip-invalid``. The output file is written
under a temporary name and renamed into place when the run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from kalm_t5gemma2_vllm_plugin.cli.common import (
    Output,
    add_engine_arguments,
    add_long_document_arguments,
    configure_vllm_environment,
    flag_error,
    open_output,
    reranker_kwargs,
    resolve_cli_model,
)
from kalm_t5gemma2_vllm_plugin.constants import SAMPLE_DOCUMENTS, SAMPLE_QUERY
from kalm_t5gemma2_vllm_plugin.errors import KaLMError, KaLMInputError
from kalm_t5gemma2_vllm_plugin.validation import (
    check_json_output,
    read_jsonl,
    unicode_problem,
)

__all__ = ["main"]

# Rows scored per engine call while streaming; vLLM batches within each call.
_ROWS_PER_CALL = 2048


@dataclass
class _Row:
    index: int
    id: Any
    query: str
    document: str
    instruction: str | None


def _parse_row(data: Any, where: str, index: int) -> _Row:
    if not isinstance(data, dict):
        raise KaLMInputError(
            f"{where}: a row must be a JSON object, got {type(data).__name__}"
        )
    for key in ("query", "document"):
        if not isinstance(data.get(key), str):
            raise KaLMInputError(f"{where}: field {key!r} must be a string")
    instruction = data.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise KaLMInputError(f"{where}: field 'instruction' must be a string or null")
    for key in ("query", "document", "instruction"):
        if isinstance(data.get(key), str) and (problem := unicode_problem(data[key])):
            raise KaLMInputError(f"{where}: field {key!r} {problem}")
    if "id" in data:  # echoed in the output row, which must be strict JSON
        try:
            check_json_output(data["id"], "field 'id'")
        except KaLMInputError as exc:
            raise KaLMInputError(f"{where}: {exc}") from None
    return _Row(
        index, data.get("id", index), data["query"], data["document"], instruction
    )


def _read_rows(
    lines: Iterable[bytes | str], name: str
) -> Iterator[_Row | KaLMInputError]:
    """Rows in file order; a malformed one is yielded as its error."""
    for index, (line_number, data) in enumerate(read_jsonl(lines, name)):
        if isinstance(data, KaLMInputError):
            yield data
            continue
        try:
            yield _parse_row(data, f"{name}:{line_number}", index)
        except KaLMInputError as exc:
            yield exc


def _score_rows(
    reranker: Any, rows: list[_Row], args: argparse.Namespace
) -> list[tuple[float, dict[str, Any]]]:
    """``(margin, output record)`` per row, in row order."""
    scored: dict[int, dict[str, Any]] = {}
    groups: dict[str | None, list[_Row]] = {}
    for row in rows:
        groups.setdefault(row.instruction, []).append(row)
    for instruction, group in groups.items():
        values = reranker.predict(
            [(r.query, r.document) for r in group],
            instruction=instruction,
            return_margin=True,
            **_call_options(args),
        )
        scored.update((r.index, v) for r, v in zip(group, values, strict=True))

    out = []
    for row in rows:
        item = scored[row.index]
        margin = item["margin"]
        record: dict[str, Any] = {
            "id": row.id,
            "query": row.query,
            "document": row.document,
            "score": item["score"],
        }
        if args.return_margin:
            record["margin"] = margin
        if "windows" in item:
            record["windows"] = item["windows"]
            record["best_window"] = item["best_window"]
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


def _write(out: Output, record: dict[str, Any]) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _call_options(args: argparse.Namespace) -> dict[str, Any]:
    """The per-call options of ``predict``/``rank`` the flags set."""
    return {
        "long_document": args.long_document,
        "window_overlap": args.window_overlap,
        "max_windows_per_document": args.max_windows_per_document,
        "encoder_chunk_size": args.request_chunk_size,
    }


def _rank_sample(reranker: Any, args: argparse.Namespace, out: Output) -> None:
    results = reranker.rank(
        SAMPLE_QUERY,
        list(SAMPLE_DOCUMENTS),
        top_k=args.top_k,
        return_margin=args.return_margin,
        **_call_options(args),
    )
    for rank, result in enumerate(results, start=1):
        record = {
            "rank": rank,
            "query": SAMPLE_QUERY,
            "document": SAMPLE_DOCUMENTS[result["corpus_id"]],
            **result,
        }
        _write(out, record)


def _rerank_file(
    reranker: Any, args: argparse.Namespace, source: IO[Any], out: Output
) -> KaLMInputError | None:
    """Score the input into ``out``; the first malformed row, unless skipped
    (the rows before it are written, as the best ``--top-k`` when asked)."""
    from tqdm import tqdm

    name = "<stdin>" if args.input_jsonl == "-" else args.input_jsonl
    progress = tqdm(unit=" rows", disable=not sys.stderr.isatty(), file=sys.stderr)
    kept: list[tuple[float, dict[str, Any]]] = []
    skipped: list[KaLMInputError] = []
    error: KaLMInputError | None = None
    with contextlib.closing(progress):
        items = _read_rows(source, name)
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
            scored = _score_rows(reranker, batch, args)
            if args.top_k is None:
                for _, record in scored:
                    _write(out, record)
            else:
                kept = _top_k_per_query(itertools.chain(kept, scored), args.top_k)
            progress.update(len(batch))
    for _, record in kept:
        _write(out, record)
    if skipped:
        print(
            f"Skipped {len(skipped)} invalid row(s); first: {skipped[0]}",
            file=sys.stderr,
        )
    return error


def _open_input(path: str | None) -> IO[Any] | None:
    """The input as bytes (each line is decoded on its own, so a bad byte costs
    one row), opened before the engine starts so a missing file fails at once."""
    if path is None:
        return None
    if path == "-":
        return getattr(sys.stdin, "buffer", sys.stdin)  # type: ignore[no-any-return]
    try:
        return open(path, "rb")  # noqa: SIM115 - closed by _run
    except OSError as exc:
        raise KaLMError(f"--input-jsonl {path}: {exc.strerror}") from None


def _same_file_error(args: argparse.Namespace) -> str | None:
    """Writing the output over the input would empty it before it is read."""
    source, target = args.input_jsonl, args.output_jsonl
    if source in (None, "-") or target is None:
        return None
    try:
        same = os.path.samefile(source, target)
    except OSError:  # one of them does not exist: not the same file
        same = os.path.realpath(source) == os.path.realpath(target)
    if not same:
        return None
    return (
        f"--output-jsonl {target} is the same file as --input-jsonl {source}; "
        f"write the output to another file"
    )


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
    add_long_document_arguments(parser)
    parser.add_argument(
        "--request-chunk-size",
        type=int,
        default=None,
        help="pool passages coarser than the engine (a multiple of "
        "--encoder-chunk-size, up to 32): the engine's states are re-pooled",
    )
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    if args.top_k is not None and args.top_k < 0:
        parser.error("--top-k must be >= 0")

    if (same := _same_file_error(args)) is not None:
        print(f"kalm-vllm-rerank: error: {same}", file=sys.stderr)
        return 2

    configure_vllm_environment(in_process=True)
    try:
        error = _run(args)
    except (KaLMError, OSError) as exc:
        print(f"kalm-vllm-rerank: error: {flag_error(exc)}", file=sys.stderr)
        return 2
    if error is not None:
        print(f"kalm-vllm-rerank: error: {error}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> KaLMInputError | None:
    """Open the input and the output, then rank; the first malformed row."""
    source = _open_input(args.input_jsonl)
    keep_open = source is None or args.input_jsonl == "-"
    with (
        contextlib.nullcontext() if keep_open else contextlib.closing(source),
        open_output(args.output_jsonl, "--output-jsonl") as out,
    ):
        _, model = resolve_cli_model(args.model)
        from kalm_t5gemma2_vllm_plugin.rerankers.vllm import KaLMVLLMReranker

        with KaLMVLLMReranker(model, **reranker_kwargs(args)) as reranker:
            print(
                f"KaLM reranker on vLLM: model={model} dtype={reranker.dtype} "
                f"{reranker.sizes.describe()} "
                f"encoder_chunk_size={args.encoder_chunk_size}",
                file=sys.stderr,
            )
            if source is None:
                _rank_sample(reranker, args, out)
                return None
            return _rerank_file(reranker, args, source, out)


if __name__ == "__main__":
    sys.exit(main())
