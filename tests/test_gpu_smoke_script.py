# SPDX-License-Identifier: Apache-2.0
"""scripts/gpu_smoke.sh plans and collects its GPU run without a GPU (--dry-run)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_smoke.sh"


def _dry_run(*args: str) -> subprocess.CompletedProcess[str]:
    # This interpreter collects: the selection must exist in this checkout.
    return subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=120,
        capture_output=True,
        text=True,
    )


def test_dry_run_plans_the_gpu_steps_and_collects_them(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    done = _dry_run("--venv", str(venv))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    plan = done.stdout
    assert f"-m venv --clear {venv}" in plan
    assert "pip install --disable-pip-version-check vllm==0.34.0 pytest" in plan
    assert "--no-deps -e ." in plan
    assert "--timeout=300 tests/engine/test_fidelity.py --deselect" in plan
    assert "-s tests/engine/test_fidelity.py::test_bfloat16_margin" in plan
    assert "--timeout=480 tests/server/test_vllm_openai_server.py" in plan
    counts = re.search(r"^collected: (.*) = (\d+) tests$", plan, re.MULTILINE)
    assert counts, plan[-3000:]
    assert int(counts[2]) > 0 and ", bf16 1," in counts[1]
    assert not venv.exists()  # a dry run creates nothing


def test_dry_run_refuses_a_missing_selection_and_passes_the_version_on() -> None:
    done = _dry_run("--vllm", "0.33.0", "tests/engine/no_such_test.py")
    assert done.returncode == 1
    assert "vllm==0.33.0" in done.stdout
    assert "selects tests/engine/no_such_test.py: no such file" in done.stderr
