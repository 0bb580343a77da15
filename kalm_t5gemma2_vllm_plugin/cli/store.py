# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-store``: inspect a passage store written by ``kalm-vllm-encode``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kalm_t5gemma2_vllm_plugin.errors import KaLMError

if TYPE_CHECKING:
    from kalm_t5gemma2_vllm_plugin.store.verify import VerifyReport

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kalm-vllm-store``; ``verify`` exits 0 when the store is
    sound, 1 when anything in it is corrupt, 2 when it cannot be checked.

    Example:
        >>> main(["verify", "./kalm-store"])
        ./kalm-store: 300 passages in 10 shards checked: OK
        0
    """
    parser = argparse.ArgumentParser(
        prog="kalm-vllm-store",
        description="Inspect a passage store written by kalm-vllm-encode.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify",
        help="check the index, every shard and every passage's checksum",
        description="Check the index (SQLite integrity_check and the passage "
        "count), every shard's size and sha256, and every passage's states "
        "against their checksum. Exit 0: sound; 1: corrupt; 2: not checkable.",
    )
    verify.add_argument("store", type=Path, help="the store directory")
    verify.add_argument(
        "--json", action="store_true", help="print one JSON object instead of text"
    )
    args = parser.parse_args(argv)

    from kalm_t5gemma2_vllm_plugin.cli.common import Output, flush_stdout
    from kalm_t5gemma2_vllm_plugin.store.verify import verify_store

    try:
        report = verify_store(args.store)
        out = Output(sys.stdout, "stdout")
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


def _summary(report: VerifyReport) -> str:
    checked = (
        f"{report.store}: {report.passages} passages in {report.shards} shards checked"
    )
    if report.ok:
        return f"{checked}: OK"
    return (
        f"{checked}: CORRUPT ({len(report.problems)} problem(s), "
        f"{len(report.corrupt_passages)} passage(s) damaged)"
    )


if __name__ == "__main__":
    sys.exit(main())
