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
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kalm_t5gemma2_vllm_plugin.cli.common import (
    add_engine_arguments,
    configure_vllm_environment,
    flag_error,
    reranker_kwargs,
    resolve_cli_model,
)
from kalm_t5gemma2_vllm_plugin.constants import SAMPLE_DOCUMENTS, SAMPLE_QUERY
from kalm_t5gemma2_vllm_plugin.errors import KaLMError, KaLMInputError

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


def _parse_row(line: str, where: str, index: int) -> _Row:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise KaLMInputError(f"{where}: invalid JSON ({exc.msg})") from None
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
    return _Row(
        index, data.get("id", index), data["query"], data["document"], instruction
    )


def _read_rows(stream: IO[str], name: str) -> Iterator[_Row | KaLMInputError]:
    """Rows in file order; a malformed one is yielded as its error."""
    index = 0
    for line_number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            yield _parse_row(line, f"{name}:{line_number}", index)
        except KaLMInputError as exc:
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
    from kalm_t5gemma2_vllm_plugin.scores import score_from_margin

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
    skipped: list[KaLMInputError] = []
    error: KaLMInputError | None = None
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
        from kalm_t5gemma2_vllm_plugin.rerankers.vllm import KaLMVLLMReranker

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
    except (KaLMError, OSError) as exc:
        print(f"kalm-vllm-rerank: error: {flag_error(exc)}", file=sys.stderr)
        return 2
    finally:
        if out is not sys.stdout:
            out.close()


if __name__ == "__main__":
    sys.exit(main())
