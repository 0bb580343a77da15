# SPDX-License-Identifier: Apache-2.0
"""The plugin's passage-state cache: pooled encoder states by passage key,
least-recently-used, bounded in bytes, on the model's device.

It sits behind vLLM's own encoder cache, which vLLM sizes by the scheduler's
token budget (a few thousand pooled rows: about 60 passages of 256 tokens at
chunk 4), far below a top-100 candidate set reused across queries. Lives in
the process that runs the model; the caller reads its counters through
``EngineCounters``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from kalm_t5gemma2_vllm_plugin.counters import EngineCounters

__all__ = ["PassageCache"]


class PassageCache:
    """``key -> states [C, d]``; never holds more than ``capacity_bytes``.

    A passage larger than the whole capacity is not kept. ``capacity_bytes``
    0 turns the cache off (every lookup misses, nothing is held).
    """

    def __init__(self, capacity_bytes: int, counters: EngineCounters) -> None:
        self.capacity_bytes = max(0, int(capacity_bytes))
        self.counters = counters
        self.bytes_held = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        return list(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        states = self._entries.get(key)
        if states is None:
            self.counters.add(passage_cache_misses=1)
            return None
        self._entries.move_to_end(key)
        self.counters.add(passage_cache_hits=1)
        return states

    def put(self, key: str, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if size > self.capacity_bytes or key in self._entries:
            return
        evicted = 0
        while self.bytes_held + size > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes_held -= old.numel() * old.element_size()
            evicted += 1
        # A view of a batch's padded output would pin the whole batch: copy.
        self._entries[key] = states.detach().clone()
        self.bytes_held += size
        self.counters.add(passage_cache_evictions=evicted)
        self.counters.set(passage_cache_bytes=self.bytes_held)
