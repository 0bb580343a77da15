# SPDX-License-Identifier: Apache-2.0
"""Give a loaded checkpoint tensor's file pages back to the OS.

vLLM's safetensors iterator yields CPU tensors that alias a memory map of the
checkpoint file. Copying one into its parameter faults its pages in, and they
stay resident until the file is unmapped at the end of loading, so the load-time
peak is the parameters plus the whole file (bf16 Nano: 2,098 MB peak against
1,396 MB once ready). Dropping each tensor's pages right after its copy keeps
the peak near the parameters plus one tensor. Pages of a file mapping that were
only read are clean: dropping them loses nothing (a later read would fault them
in from the file again). Anything that is not a read-only view of a
``*.safetensors`` mapping of this process is left alone.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Any

import torch

__all__ = ["FilePages"]

_MADV_DONTNEED = 4  # Linux
_PAGE = mmap.PAGESIZE


class FilePages:
    """Releases the file pages behind loaded tensors (one per load_weights call)."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []
        self._madvise = _libc_madvise() if sys.platform == "linux" else None
        self.released_bytes = 0

    def release(self, tensor: torch.Tensor) -> None:
        if self._madvise is None or tensor.device.type != "cpu":
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not self._in_file_mapping(start, end):
            return
        # Only whole pages inside the tensor: a neighbour's pages stay as they are.
        low = -(-start // _PAGE) * _PAGE
        high = end // _PAGE * _PAGE
        if high > low and self._madvise(low, high - low, _MADV_DONTNEED) == 0:
            self.released_bytes += high - low

    def _in_file_mapping(self, start: int, end: int) -> bool:
        for refresh in (False, True):
            if refresh:
                self._ranges = _safetensors_mappings()
            if any(lo <= start and end <= hi for lo, hi in self._ranges):
                return True
        return False


def _libc_madvise() -> Any:
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def _safetensors_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of ``*.safetensors`` files that
    are not writable-shared (a private or read-only mapping: its pages are clean
    unless written, and nothing writes to a checkpoint)."""
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or not fields[5].rstrip().endswith(".safetensors"):
                    continue
                perms = fields[1]
                if "s" in perms and "w" in perms:
                    continue
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    except OSError:
        return []
    return ranges
