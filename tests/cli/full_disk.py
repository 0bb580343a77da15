# SPDX-License-Identifier: Apache-2.0
"""A real full filesystem for the CLI tests, made without root."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

#: The repository root: subprocesses run there, so they import this tree.
ROOT = Path(__file__).resolve().parents[2]


def in_a_full_filesystem(directory: Path, size: str, script: str) -> list[str]:
    """``sh -c script`` with ``directory`` a fresh tmpfs of ``size``, mounted in
    a private user and mount namespace (no root needed, nothing left behind)."""
    probe = (
        subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "true"],
            capture_output=True,
        )
        if shutil.which("unshare")
        else None
    )
    if probe is None or probe.returncode != 0:
        pytest.skip("no unprivileged mount namespaces here (unshare failed)")
    directory.mkdir()
    mount = f'mount -t tmpfs -o size={size} none "{directory}"'
    return [
        "unshare", "--user", "--map-root-user", "--mount",
        "sh", "-c", f"{mount} && {script}",
    ]  # fmt: skip


def _failed_clearly(command: list[str], **streams: Any) -> str:
    """Run a CLI that must fail as a user error (exit 2, no traceback); stderr."""
    done = subprocess.run(
        command, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=300, **streams
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done.stderr


def fails_in_a_full_filesystem(directory: Path, size: str, script: str) -> str:
    """``script`` run with ``directory`` a full-size tmpfs; its stderr."""
    command = in_a_full_filesystem(directory, size, script)
    return _failed_clearly(command, stdout=subprocess.DEVNULL)


def assert_full_stdout_is_one_clear_error(command: list[str], prog: str) -> None:
    """Run ``command`` with stdout on ``/dev/full``: exit 2, one line, no
    traceback and no "Exception ignored" at interpreter exit."""
    with open("/dev/full", "w") as full:
        stderr = _failed_clearly(command, stdout=full)
    assert stderr.endswith(
        f"{prog}: error: stdout: could not write (No space left on device)\n"
    )
    assert "Exception ignored" not in stderr
