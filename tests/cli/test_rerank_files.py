# SPDX-License-Identifier: Apache-2.0
"""``kalm-vllm-rerank`` input and output files under attack: the same file on
both sides, broken rows, and full disks (real engine, tiny checkpoint)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin.cli import rerank as cli
from tests.cli.full_disk import (
    assert_full_stdout_is_one_clear_error,
    fails_in_a_full_filesystem,
)

pytestmark = pytest.mark.engine

ROWS = [{"query": "q", "document": f"document {i}", "id": i} for i in range(4)]


def _jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _main(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    code = cli.main(["--model", str(checkpoint), "--dtype", "float32", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _rerank_file(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], source: Path, target: object
) -> tuple[int, str, str]:
    return _main(
        checkpoint, capsys, "--input-jsonl", str(source), "--output-jsonl", str(target)
    )


def _spellings(tmp_path: Path, source: Path) -> dict[str, str]:
    (tmp_path / "link.jsonl").symlink_to(source)
    os.link(source, tmp_path / "hard.jsonl")
    return {
        "same-path": str(source),
        "dot-dot": str(tmp_path / "sub" / ".." / source.name),
        "relative": os.path.relpath(source),
        "symlink": str(tmp_path / "link.jsonl"),
        "hard-link": str(tmp_path / "hard.jsonl"),
    }


@pytest.mark.parametrize(
    "spelling", ["same-path", "dot-dot", "relative", "symlink", "hard-link"]
)
def test_output_onto_the_input_is_refused_and_the_input_kept(
    tmp_path: Path,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    spelling: str,
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(_jsonl(ROWS))
    (tmp_path / "sub").mkdir()
    target = _spellings(tmp_path, source)[spelling]
    code, out, err = _main(
        tiny_checkpoint, capsys, "--input-jsonl", str(source), "--output-jsonl", target
    )
    assert code == 2 and out == ""
    assert err == (
        f"kalm-vllm-rerank: error: --output-jsonl {target} is the same file as "
        f"--input-jsonl {source}; write the output to another file\n"
    )
    assert source.read_bytes() == _jsonl(ROWS)


def test_a_broken_row_stops_after_the_rows_before_it_and_replaces_the_output(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(
        _jsonl(ROWS[:2]) + b'{"query": "caf\xe9", "document": "d"}\n' + _jsonl(ROWS[2:])
    )
    target = tmp_path / "out.jsonl"
    target.write_text("an older output\n")
    code, out, err = _rerank_file(tiny_checkpoint, capsys, source, str(target))
    assert code == 2 and out == ""
    assert err.endswith(
        f"kalm-vllm-rerank: error: {source}:3: not valid UTF-8 (byte 0xE9 at byte "
        "15 of the line: invalid continuation byte)\n"
    )
    written = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in written] == [0, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl", "out.jsonl"]


def test_skip_invalid_skips_every_kind_of_broken_line_and_keeps_the_rest(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.cli.test_jsonl_rows import BAD_LINES

    broken = b"".join(bad + b"\n" for bad, _ in BAD_LINES.values())
    utf16 = "\n".join(['{"query": "q", "document": "d", "id": 9}'] * 2)
    utf16_lines = utf16.encode("utf-16")  # two lines, the first with a BOM
    source = tmp_path / "in.jsonl"
    source.write_bytes(_jsonl(ROWS[:2]) + broken + _jsonl(ROWS[2:]) + utf16_lines)
    code, out, err = _main(
        tiny_checkpoint, capsys, "--input-jsonl", str(source), "--skip-invalid"
    )
    assert code == 0, err
    assert [json.loads(line)["id"] for line in out.splitlines()] == [0, 1, 2, 3]
    first = BAD_LINES["latin-1"][1]
    skipped = len(BAD_LINES) + 2
    # (no "Traceback" check in process: vLLM's log handler keeps the stderr of
    # an earlier test's capture; the subprocess tests below check it)
    assert f"Skipped {skipped} invalid row(s); first: {source}:3: {first}\n" in err


def test_top_k_with_a_broken_row_writes_the_best_of_the_rows_before_it(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(_jsonl(ROWS[:3]) + b'{"query": "\\udc00", "document": "d"}\n')
    code, out, err = _main(
        tiny_checkpoint, capsys, "--input-jsonl", str(source), "--top-k", "1"
    )
    assert code == 2
    assert f"{source}:4: field 'query' must be valid Unicode text" in err
    assert len(out.splitlines()) == 1 and json.loads(out)["id"] in (0, 1, 2)


def test_dev_full_as_the_output_is_one_clear_error(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(_jsonl(ROWS))
    code, out, err = _rerank_file(tiny_checkpoint, capsys, source, "/dev/full")
    assert code == 2 and out == ""
    assert err.endswith(
        "kalm-vllm-rerank: error: --output-jsonl /dev/full: could not write "
        "(No space left on device)\n"
    )
    assert Path("/dev/full").is_char_device()  # written in place, never replaced


def _command(checkpoint: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kalm_t5gemma2_vllm_plugin.cli.rerank",
        "--model",
        str(checkpoint),
        "--dtype",
        "float32",
        *args,
    ]


def test_a_full_stdout_is_one_clear_error(tiny_checkpoint: Path) -> None:
    assert_full_stdout_is_one_clear_error(_command(tiny_checkpoint), "kalm-vllm-rerank")


def test_a_full_disk_leaves_the_existing_output_as_it_was(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A real filesystem that fills up mid-run (a 64 KiB tmpfs, ~230 KB of
    output): exit 2 with one line, the old output intact, no temporary left."""
    source = tmp_path / "in.jsonl"
    big = [{"query": "q", "document": "word " * 1000, "id": i} for i in range(40)]
    source.write_bytes(_jsonl(big))
    full, report = tmp_path / "full", tmp_path / "report"
    rerank = shlex.join(
        _command(
            tiny_checkpoint,
            "--input-jsonl",
            str(source),
            "--output-jsonl",
            str(full / "out.jsonl"),
        )
    )
    script = (
        f'printf "old output\\n" > "{full}/out.jsonl" && {rerank}; rc=$?; '
        f'ls -A "{full}" > "{report}.ls"; cat "{full}/out.jsonl" > "{report}.out"; '
        f"exit $rc"
    )
    stderr = fails_in_a_full_filesystem(full, "64k", script)
    assert stderr.endswith(
        f"kalm-vllm-rerank: error: --output-jsonl {full}/out.jsonl: could not "
        f"write (No space left on device); {full}/out.jsonl was left as it was\n"
    )
    assert Path(f"{report}.out").read_text() == "old output\n"
    assert Path(f"{report}.ls").read_text() == "out.jsonl\n"


def test_an_output_through_a_symlink_replaces_the_file_it_points_to(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, real = tmp_path / "in.jsonl", tmp_path / "real.jsonl"
    source.write_bytes(_jsonl(ROWS))
    real.write_text("old\n")
    real.chmod(0o640)
    (tmp_path / "link.jsonl").symlink_to(real)
    code, _, err = _main(
        tiny_checkpoint,
        capsys,
        "--input-jsonl",
        str(source),
        "--output-jsonl",
        str(tmp_path / "link.jsonl"),
    )
    assert code == 0, err
    assert (tmp_path / "link.jsonl").is_symlink()
    assert [json.loads(line)["id"] for line in real.read_text().splitlines()] == [
        0,
        1,
        2,
        3,
    ]
    assert real.stat().st_mode & 0o777 == 0o640  # the file's permissions kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl",
        "link.jsonl",
        "real.jsonl",
    ]
