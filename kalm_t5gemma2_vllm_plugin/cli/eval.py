# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-eval``: rerank a first stage on a BEIR-layout dataset and report
nDCG@10, MRR@10, Recall@10/100 and MAP beside the first stage's, with paired
Fisher randomization p-values (ranx).

Without ``--run`` the first stage is BM25 over the corpus (bm25s). Results go
to ``--output`` (runs, ``report.json``, ``report.md``, a PNG, the resume
journal); ``report.md`` is also printed on stdout, logs go to stderr. A killed
run resumes where it stopped when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kalm_t5gemma2_vllm_plugin.cli.common import (
    add_engine_arguments,
    configure_vllm_environment,
    flag_error,
    reranker_kwargs,
    resolve_cli_model,
)
from kalm_t5gemma2_vllm_plugin.errors import KaLMError

__all__ = ["main"]

_PROG = "kalm-vllm-eval"
#: Option fields of ``evaluate`` -> their flags, for messages.
_FLAGS = {
    "depth": "--depth",
    "long_document": "--long-document",
    "chunk_size_sweep": "--chunk-size-sweep",
    "restart": "--restart",
    "run": "--run",
    "document_ids": "--passage-store",
    "passage_store": "--passage-store",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Rerank a first stage on a BEIR-layout dataset and report "
        "nDCG@10, MRR@10, Recall@10/100 and MAP beside the first stage's, with "
        "paired Fisher randomization p-values. Without --run the first stage is "
        "BM25. A killed run resumes when the same command runs again.",
    )
    parser.add_argument(
        "data_dir",
        type=Path,
        help="BEIR-layout directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv",
    )
    parser.add_argument(
        "--run",
        type=Path,
        help="first-stage run: TREC (qid Q0 docid rank score tag) or BEIR-style "
        "JSON ({qid: {docid: score}}); default: BM25 over the corpus",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=100,
        help="candidates reranked per query (default 100)",
    )
    parser.add_argument(
        "--split", default="test", help="judgements: qrels/<split>.tsv (default test)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="output directory (default: ./kalm-eval-<dataset>-<split>)",
    )
    parser.add_argument(
        "--passage-store",
        help="documents go by id from this store (kalm-vllm-encode: a directory, "
        "a .lance path or an s3:// URI), not as text",
    )
    parser.add_argument(
        "--decoder-only",
        action="store_true",
        help="load no encoder (needs --passage-store holding every candidate)",
    )
    parser.add_argument(
        "--long-document",
        choices=["truncate", "max", "mean"],
        default=None,
        help="policy for documents beyond --document-max-length (passed to rank)",
    )
    parser.add_argument(
        "--chunk-size-sweep",
        type=int,
        nargs="+",
        metavar="N",
        help="compare these chunk sizes in one run: one engine at the finest, "
        "coarser sizes by per-request compression (overrides --encoder-chunk-size)",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard the journal in --output instead of resuming it",
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    add_engine_arguments(parser)
    # Off by default here: each query is scored from a fresh state, so a
    # resumed run writes the same bytes as an uninterrupted one.
    parser.set_defaults(passage_cache_mb=0.0)
    for action in parser._actions:
        if action.dest == "passage_cache_mb":
            action.help = (
                "the plugin's passage-state cache, MiB (default here 0: each query "
                "is scored from a fresh state and a resumed run is byte-identical; "
                "> 0 reuses passages across queries, faster when they recur)"
            )
    return parser


def _message(error: Exception) -> str:
    message = flag_error(error)
    field = getattr(error, "field", None)
    if field in _FLAGS and message.startswith(field):
        return _FLAGS[field] + message[len(field) :]
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kalm-vllm-eval``.

    Example:
        $ kalm-vllm-eval tests/data/beir-fixture --output /tmp/eval --depth 20
        # kalm-vllm-eval: beir-fixture (test)
        | metric | first stage | reranked | change | p (Fisher) |
        ...
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.depth < 1:
        parser.error("--depth must be >= 1")
    if args.decoder_only and args.passage_store is None:
        parser.error("--decoder-only needs --passage-store")
    output = args.output or Path(
        f"kalm-eval-{args.data_dir.resolve().name}-{args.split}"
    )
    configure_vllm_environment(in_process=True)
    try:
        report = _run(args, output)
    except (KaLMError, OSError) as exc:
        print(f"{_PROG}: error: {_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"{_PROG}: interrupted; finished queries are kept in {output}/"
            f"journal.jsonl: run the same command again to resume.",
            file=sys.stderr,
        )
        return 130
    from kalm_t5gemma2_vllm_plugin.evaluation.report import markdown_report

    sys.stdout.write(markdown_report(report))
    print(f"{_PROG}: wrote {output}/", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace, output: Path) -> dict[str, object]:
    from kalm_t5gemma2_vllm_plugin.evaluation import prepare, rerank_and_report

    # Every input is read and checked before a model is resolved or started.
    plan = prepare(
        args.data_dir,
        output,
        run=args.run,
        depth=args.depth,
        split=args.split,
        passage_store=args.passage_store,
        long_document=args.long_document,
        chunk_size_sweep=args.chunk_size_sweep,
        restart=args.restart,
    )
    model, _ = resolve_cli_model(args.model)
    return rerank_and_report(
        plan,
        model=model,
        plot=not args.no_plot,
        decoder_only=args.decoder_only,
        **reranker_kwargs(args),
    )


if __name__ == "__main__":
    sys.exit(main())
