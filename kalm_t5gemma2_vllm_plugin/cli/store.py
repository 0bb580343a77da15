# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-store``: verify, compact or migrate a passage store."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from kalm_t5gemma2_vllm_plugin.errors import KaLMError

if TYPE_CHECKING:
    from kalm_t5gemma2_vllm_plugin.cli.common import Output
    from kalm_t5gemma2_vllm_plugin.store.verify import VerifyReport

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kalm-vllm-store``. ``verify`` exits 0 when the store is
    sound, 1 when anything in it is corrupt, 2 when it cannot be checked;
    ``compact`` and ``migrate`` exit 0 when done, 2 on an error.

    A store is a directory, or a Lance store (a path ending in ``.lance`` or an
    object store URI such as ``s3://bucket/store.lance``).

    Example:
        >>> main(["verify", "./kalm-store"])
        ./kalm-store: 300 passages in 10 shards checked: OK
        0
        >>> main(["migrate", "./kalm-store", "s3://bucket/store.lance"])
        {"documents": 300, "windows": 300, "store": "s3://bucket/store.lance"}
        0
    """
    from kalm_t5gemma2_vllm_plugin.cli.common import add_store_option_argument

    parser = argparse.ArgumentParser(
        prog="kalm-vllm-store",
        description="Inspect and maintain a passage store written by "
        "kalm-vllm-encode: a directory, or a Lance store (a path ending in "
        ".lance or an object store URI).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify",
        help="check the index, every shard and every passage's checksum",
        description="Check the index (SQLite integrity_check and the passage "
        "count), every shard's size and sha256, and every passage's states "
        "against their checksum; a Lance store: every row's states against "
        "their checksum and every document's windows. Exit 0: sound; 1: "
        "corrupt; 2: not checkable.",
    )
    verify.add_argument("store", help="the store directory or Lance URI")
    verify.add_argument(
        "--json", action="store_true", help="print one JSON object instead of text"
    )
    compact = commands.add_parser(
        "compact",
        help="Lance store: drop superseded rows, merge fragments, update the index",
        description="Delete the rows later encodings superseded, rewrite small "
        "fragments, update the BTREE index on id and remove old versions. A "
        "directory store has nothing to compact.",
    )
    compact.add_argument("store", help="the store directory or Lance URI")
    compact.add_argument(
        "--keep-versions-s",
        type=float,
        default=3600.0,
        help="keep versions newer than this many seconds (readers still on an "
        "older version fail once it is removed; default 3600)",
    )
    migrate = commands.add_parser(
        "migrate",
        help="copy a store into another (directory -> Lance), verified row by row",
        description="Copy every document of SRC into DST with SRC's identity, "
        "then read every row back from DST and compare it with SRC's.",
    )
    migrate.add_argument("source", metavar="SRC", help="the store to copy")
    migrate.add_argument("target", metavar="DST", help="the store to write")
    for command in (verify, compact, migrate):
        add_store_option_argument(command)
    args = parser.parse_args(argv)

    from kalm_t5gemma2_vllm_plugin.cli.common import Output, flush_stdout
    from kalm_t5gemma2_vllm_plugin.store.uri import parse_store_options

    out = Output(sys.stdout, "stdout")
    try:
        options = parse_store_options(args.store_option, "--store-option")
        if args.command == "compact":
            return _compact(args, options, out)
        if args.command == "migrate":
            return _migrate(args, options, out)
        from kalm_t5gemma2_vllm_plugin.store.verify import verify_store

        report = verify_store(args.store, storage_options=options)
        if args.json:
            out.write(json.dumps(report.as_dict(), ensure_ascii=False) + "\n")
        else:
            for problem in report.problems:
                passage = (
                    ""
                    if problem.passage_id is None
                    else f"passage {problem.passage_id!r}: "
                )
                out.write(f"CORRUPT {problem.file}: {passage}{problem.message}\n")
            for note in report.notes:
                out.write(f"note: {note}\n")
            out.write(_summary(report) + "\n")
        flush_stdout()
    except (KaLMError, OSError) as exc:
        print(f"kalm-vllm-store: error: {exc}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1


def _compact(args: argparse.Namespace, options: dict[str, str], out: Output) -> int:
    from kalm_t5gemma2_vllm_plugin.cli.common import flush_stdout
    from kalm_t5gemma2_vllm_plugin.store.maintenance import compact_store

    keep = timedelta(seconds=max(0.0, args.keep_versions_s))
    counts = compact_store(args.store, older_than=keep, storage_options=options)
    if counts is None:
        out.write(
            f"{args.store}: a directory store has nothing to compact (its writer "
            f"removes replaced shards).\n"
        )
    else:
        out.write(json.dumps({**counts, "store": args.store}) + "\n")
    flush_stdout()
    return 0


def _migrate(args: argparse.Namespace, options: dict[str, str], out: Output) -> int:
    from kalm_t5gemma2_vllm_plugin.cli.common import flush_stdout
    from kalm_t5gemma2_vllm_plugin.store.maintenance import migrate_store

    counts = migrate_store(args.source, args.target, storage_options=options)
    out.write(json.dumps({**counts, "store": args.target}) + "\n")
    flush_stdout()
    return 0


def _summary(report: VerifyReport) -> str:
    unit = "fragments" if report.format == "lance" else "shards"
    checked = (
        f"{report.store}: {report.passages} passages in {report.shards} {unit} checked"
    )
    if report.ok:
        return f"{checked}: OK"
    return (
        f"{checked}: CORRUPT ({len(report.problems)} problem(s), "
        f"{len(report.corrupt_passages)} passage(s) damaged)"
    )


if __name__ == "__main__":
    sys.exit(main())
