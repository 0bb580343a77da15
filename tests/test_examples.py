# SPDX-License-Identifier: Apache-2.0
"""The examples keep working (each runs in its own interpreter, as a user would)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 300) -> str:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_transformers_usage_example(tiny_checkpoint: Path) -> None:
    out = _run(
        "examples/transformers_usage.py",
        "--model",
        str(tiny_checkpoint),
        "--chunk-size",
        "none",
    )
    assert out.startswith("scores: [") and "'corpus_id'" in out


@pytest.mark.engine
def test_tiny_checkpoint_example(tmp_path: Path) -> None:
    out = _run("examples/tiny_checkpoint_rerank.py", str(tmp_path / "ck"))
    assert "The capital of China is Beijing." in out
    assert "'passages_encoded': 3" in out


def test_sample_pairs_are_valid_rows() -> None:
    lines = (ROOT / "examples" / "sample_pairs.jsonl").read_text().splitlines()
    for line in lines:
        row = json.loads(line)
        assert isinstance(row["query"], str) and isinstance(row["document"], str)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "scripts/setup.sh && .venv/bin/python -m pytest"
    assert command in readme and command in ci
