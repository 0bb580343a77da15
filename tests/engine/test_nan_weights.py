# SPDX-License-Identifier: Apache-2.0
"""A checkpoint with NaN weights is refused when the engine loads it (F13).

Before, such an engine started, ``/health`` said "ok", and every request then
failed with a non-finite score. The engine runs in a subprocess (the CLI), so
its failed start leaves this process's vLLM state alone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.engine

DAMAGED = "model.decoder.layers.0.mlp.down_proj.weight"


def test_an_engine_refuses_nan_weights_at_start_naming_the_tensor(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    damaged = tmp_path / "nan-weights"
    shutil.copytree(tiny_checkpoint, damaged)
    weights = load_file(damaged / "model.safetensors")
    weights[DAMAGED].view(-1)[::97] = float("nan")
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    bad = int(torch.isnan(weights[DAMAGED]).sum())

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "kalm_t5gemma2_vllm_plugin.cli.rerank",
            "--model",
            str(damaged),
            "--dtype",
            "float32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert run.stdout == ""  # no ranking came out
    assert f"Checkpoint tensor '{DAMAGED}' holds {bad} NaN or infinite" in run.stderr
