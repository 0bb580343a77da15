# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-encode`` with broken input rows and full disks (the real
encoder on the tiny checkpoint)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from kalm_t5gemma2_vllm_plugin.store.format import PassageStore
from tests.cli.full_disk import (
    assert_full_stdout_is_one_clear_error,
    fails_in_a_full_filesystem,
)
from tests.cli.test_jsonl_rows import ENCODE_BAD
from tests.helpers import encode_args, run_encode

GOOD = [b'{"id": "a", "text": "first"}', b'{"id": "b", "text": "second"}']


def _corpus(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_a_broken_row_stops_before_the_store_is_touched(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    bad, reason = ENCODE_BAD["latin-1"]
    corpus = _corpus(tmp_path / "c.jsonl", GOOD[0], bad, GOOD[1])
    done = run_encode(tiny_checkpoint, corpus, tmp_path / "store", check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"kalm-vllm-encode: error: {corpus}:2: {reason}\n"
    assert not (tmp_path / "store").exists()


def test_skip_invalid_leaves_every_kind_of_broken_row_out_and_counts_it(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    broken = [bad for bad, _ in ENCODE_BAD.values()]
    corpus = _corpus(tmp_path / "c.jsonl", GOOD[0], *broken, GOOD[1])
    done = run_encode(tiny_checkpoint, corpus, tmp_path / "store", "--skip-invalid")
    summary = json.loads(done.stdout)
    assert (summary["encoded"], summary["total"]) == (2, 2)
    assert summary["invalid"] == len(broken)
    first = ENCODE_BAD["latin-1"][1]
    assert f"Skipped {len(broken)} invalid row(s); first: {corpus}:2: {first}\n" in (
        done.stderr
    )
    reader = PassageStore(tmp_path / "store")
    try:
        assert reader.ids() == ["a", "b"]
    finally:
        reader.close()


def test_skip_invalid_does_not_skip_a_duplicate_id(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    corpus = _corpus(tmp_path / "c.jsonl", GOOD[0], GOOD[0])
    done = run_encode(
        tiny_checkpoint, corpus, tmp_path / "store", "--skip-invalid", check=False
    )
    assert done.returncode == 2
    assert f"{corpus}:2: duplicate id 'a' (first on line 1)" in done.stderr


def _command(checkpoint: Path, corpus: Path, store: Path) -> list[str]:
    module = [sys.executable, "-m", "kalm_t5gemma2_vllm_plugin.cli.encode"]
    return [*module, *encode_args(checkpoint, corpus, store, "--batch-size", "4")]


def test_a_full_stdout_is_one_clear_error(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    corpus = _corpus(tmp_path / "c.jsonl", *GOOD)
    assert_full_stdout_is_one_clear_error(
        _command(tiny_checkpoint, corpus, tmp_path / "store"), "kalm-vllm-encode"
    )


def test_a_store_on_a_full_disk_is_one_clear_error(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A real filesystem (a 400 KiB tmpfs) that fills up while shards are
    written: one line naming the store, what is kept, no traceback."""
    text = json.dumps("word " * 300)
    corpus = _corpus(
        tmp_path / "c.jsonl",
        *(f'{{"id": "d{i}", "text": {text}}}'.encode() for i in range(200)),
    )
    full = tmp_path / "full"
    script = shlex.join(_command(tiny_checkpoint, corpus, full / "store"))
    stderr = fails_in_a_full_filesystem(full, "400k", script)
    assert stderr.startswith(f"kalm-vllm-encode: error: --store {full}/store: ")
    assert stderr.endswith(
        "; the passages committed before it are kept, and a re-run completes them\n"
    )
    assert "No space left on device" in stderr or "disk" in stderr
