# SPDX-License-Identifier: Apache-2.0
"""The plugin's passage cache on hand-made access sequences (no engine)."""

from __future__ import annotations

import torch

from kalm_t5gemma2_vllm_plugin.counters import EngineCounters
from kalm_t5gemma2_vllm_plugin.passage_key import passage_key
from kalm_t5gemma2_vllm_plugin.vllm_model.passage_cache import PassageCache

ROW_BYTES = 4 * 8  # one pooled row of 8 float32 values


def _states(rows: int, fill: float) -> torch.Tensor:
    return torch.full((rows, 8), fill, dtype=torch.float32)


def test_half_the_working_set_evicts_in_lru_order_and_never_overfills() -> None:
    counters = EngineCounters()
    cache = PassageCache(capacity_bytes=4 * ROW_BYTES, counters=counters)
    for key in "abcd":  # a working set of 8 rows, one row each
        cache.put(key, _states(1, 1.0))
    assert cache.keys() == ["a", "b", "c", "d"] and cache.bytes_held == 4 * ROW_BYTES
    assert cache.get("a") is not None  # a becomes the most recent
    cache.put("e", _states(1, 2.0))  # evicts b, the least recently used
    assert cache.keys() == ["c", "d", "a", "e"]
    cache.put("f", _states(2, 3.0))  # two rows: evicts c and d
    assert cache.keys() == ["a", "e", "f"]
    assert cache.get("b") is None and cache.get("c") is None
    for key, rows in [("g", 1), ("h", 3), ("i", 1), ("j", 2)]:
        cache.put(key, _states(rows, 4.0))
        assert cache.bytes_held <= cache.capacity_bytes
    stats = counters.snapshot()
    assert stats["passage_cache_hits"] == 1 and stats["passage_cache_misses"] == 2
    assert stats["passage_cache_bytes"] == cache.bytes_held
    assert stats["passage_cache_evictions"] == 3 + len("aefg") + 1  # b c d, then
    assert cache.keys() == ["i", "j"]


def test_a_hit_returns_the_states_that_were_put() -> None:
    cache = PassageCache(capacity_bytes=10 * ROW_BYTES, counters=EngineCounters())
    states = torch.randn(3, 8)
    kept = states.clone()
    cache.put("k", states)
    states.add_(1.0)  # the cache holds a copy, not the caller's (batch) tensor
    hit = cache.get("k")
    assert hit is not None and torch.equal(hit, kept)


def test_size_zero_is_off_and_a_passage_larger_than_the_cache_is_not_kept() -> None:
    off = PassageCache(capacity_bytes=0, counters=EngineCounters())
    off.put("a", _states(1, 1.0))
    assert len(off) == 0 and off.get("a") is None
    small = PassageCache(capacity_bytes=2 * ROW_BYTES, counters=EngineCounters())
    small.put("a", _states(1, 1.0))
    small.put("big", _states(3, 1.0))
    assert small.keys() == ["a"]


def test_the_key_is_the_encoder_ids_and_the_chunk_size() -> None:
    assert passage_key([2, 10, 11], 4) == passage_key([2, 10, 11], 4)
    assert passage_key([2, 10, 11], 4) != passage_key([2, 10, 12], 4)
    assert passage_key([2, 10, 11], 4) != passage_key([2, 10, 11], 8)
    # no pooling is the same maths as a factor of 1
    assert passage_key([2, 10], None) == passage_key([2, 10], 1)
    assert len(passage_key([], 4)) == 40
