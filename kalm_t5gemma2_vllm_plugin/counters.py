# SPDX-License-Identifier: Apache-2.0
"""Engine counters shared across processes through a small memory-mapped file.

The model runs in vLLM's worker process; the reranker and the HTTP service read
its counters (passages encoded, requests scored) from their own process. A file
of a few int64 slots, written by the single worker and read by anyone, needs no
RPC and no pickling, and works the same with the engine in-process.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from pathlib import Path

__all__ = ["COUNTER_NAMES", "LEVELS", "EngineCounters"]

COUNTER_NAMES = (
    "passages_encoded",  # passages run through the encoder
    "passage_tokens_encoded",  # their encoder tokens
    "passages_from_store",  # precomputed passages received (no encoder work)
    "requests_scored",  # requests run through the decoder
    "passage_cache_hits",  # passages served by the plugin's passage cache
    "passage_cache_misses",  # lookups it could not serve
    "passage_cache_evictions",  # entries dropped to stay within its size
    "passage_cache_bytes",  # bytes it holds now (a level, not a count)
)
#: Counters that hold a current level; ``stats()`` reports them as they are.
LEVELS = frozenset({"passage_cache_bytes"})
_FORMAT = "<" + "q" * len(COUNTER_NAMES)
_SIZE = struct.calcsize(_FORMAT)


class EngineCounters:
    """Monotonic counters in a file; one writer (the model), any readers."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        """Attach to the counters file at ``path``; ``None`` keeps them in memory."""
        self.path = None if path is None else Path(path)
        if self.path is None:
            self._map = mmap.mmap(-1, _SIZE)
        else:
            with open(self.path, "r+b") as f:
                self._map = mmap.mmap(f.fileno(), _SIZE)

    @classmethod
    def create(cls) -> EngineCounters:
        """A new zeroed counters file in the temp directory (remove with ``unlink``)."""
        fd, name = tempfile.mkstemp(prefix="kalm-counters-", suffix=".bin")
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * _SIZE)
        return cls(name)

    def add(self, **increments: int) -> None:
        values = list(struct.unpack(_FORMAT, self._map[:_SIZE]))
        for name, value in increments.items():
            values[COUNTER_NAMES.index(name)] += value
        self._map[:_SIZE] = struct.pack(_FORMAT, *values)

    def set(self, **levels: int) -> None:
        values = list(struct.unpack(_FORMAT, self._map[:_SIZE]))
        for name, value in levels.items():
            values[COUNTER_NAMES.index(name)] = value
        self._map[:_SIZE] = struct.pack(_FORMAT, *values)

    def snapshot(self) -> dict[str, int]:
        return dict(
            zip(COUNTER_NAMES, struct.unpack(_FORMAT, self._map[:_SIZE]), strict=True)
        )

    def unlink(self) -> None:
        self._map.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
