# SPDX-License-Identifier: Apache-2.0
"""FilePages: a loaded tensor's checkpoint pages leave memory; nothing else is touched."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kalm_t5gemma2_vllm_plugin.vllm_model.file_pages import FilePages

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="madvise, /proc")


def _resident_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (from smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps", encoding="utf-8"):
        if "-" in line.split(" ", 1)[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_copied_tensors_pages_are_released_and_values_survive(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    weights = {f"w{i}": torch.randn(512, 1024) for i in range(4)}  # 2 MiB each
    save_file(weights, str(path))
    pages = FilePages()
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            tensor = f.get_tensor(name)
            param = torch.empty_like(tensor)
            param.copy_(tensor)  # what vLLM's weight loader does: faults pages in
            before = _resident_kb(path)
            pages.release(tensor)
            assert _resident_kb(path) <= before - 1900, name  # ~2 MiB gone
            assert torch.equal(param, weights[name])
            # the view still reads the file's values (pages come back from disk)
            assert torch.equal(tensor, weights[name])
    assert pages.released_bytes >= 4 * 2 * 1024 * 1024 - 4 * 2 * 4096


def test_memory_that_is_not_a_checkpoint_mapping_is_left_alone() -> None:
    pages = FilePages()
    tensor = torch.arange(1 << 20, dtype=torch.float32)  # anonymous memory
    pages.release(tensor)
    assert pages.released_bytes == 0
    assert torch.equal(tensor, torch.arange(1 << 20, dtype=torch.float32))
