# SPDX-License-Identifier: Apache-2.0
"""The shared-pool workload and the sweep's break-even arithmetic, by hand."""

from pathlib import Path

import pytest

from kalm_t5gemma2_vllm_plugin.bench.sweep import (
    SweepShape,
    break_even,
    derived,
    plot,
    summary_table,
)
from kalm_t5gemma2_vllm_plugin.bench.workload import SharedPool


def test_candidates_are_distinct_deterministic_and_favour_popular_passages() -> None:
    pool = SharedPool(queries=200, documents=10, pool=50, doc_tokens=8)
    again = SharedPool(queries=200, documents=10, pool=50, doc_tokens=8)
    draws = [pool.candidates(q) for q in range(pool.queries)]
    assert draws == [again.candidates(q) for q in range(pool.queries)]
    assert all(len(set(d)) == 10 and all(0 <= i < 50 for i in d) for d in draws)
    counts = [sum(i in d for d in draws) for i in range(50)]
    # Zipf: the most popular passage is drawn far more often than the least
    assert counts[0] > 3 * counts[-1]
    assert len({tuple(d) for d in draws}) > 150  # queries differ


def test_hit_ceiling_counts_first_sightings() -> None:
    pool = SharedPool(queries=3, documents=4, pool=6, doc_tokens=8)
    drawn = [i for q in range(3) for i in pool.candidates(q)]
    assert pool.hit_ceiling() == pytest.approx(1 - len(set(drawn)) / 12)
    assert pool.hit_ceiling(1) == 0.0
    # every query ranks the whole pool: only the first query encodes
    assert SharedPool(4, 6, 6, 8).hit_ceiling() == pytest.approx(0.75)


def test_subset_takes_the_first_pairs_in_query_order() -> None:
    pool = SharedPool(queries=5, documents=16, pool=40, doc_tokens=8)
    calls = pool.subset(40)
    assert [q for q, _ in calls] == [0, 1, 2]
    assert [len(c) for _, c in calls] == [16, 16, 8]
    assert calls[2][1] == pool.candidates(2)[:8]


def test_passages_and_queries_do_not_depend_on_d() -> None:
    a = SharedPool(queries=2, documents=3, pool=10, doc_tokens=12)
    b = SharedPool(queries=2, documents=9, pool=10, doc_tokens=12)
    assert [a.passage(i) for i in range(10)] == [b.passage(i) for i in range(10)]
    assert a.query(0, 1) == b.query(0, 1) != a.query(1, 1)
    with pytest.raises(ValueError, match="documents"):
        SharedPool(queries=1, documents=11, pool=10, doc_tokens=8)


def test_sweep_caps_pairs_per_pass() -> None:
    shape = SweepShape(queries=16, max_pass_pairs=1600, warm_pairs=400)
    assert [shape.pool_for(d).queries for d in (16, 100, 400)] == [16, 16, 4]
    assert [shape.warm_queries(d) for d in (16, 100, 400)] == [25, 4, 1]


def test_break_even_by_hand() -> None:
    # per-pair seconds: cold 0.5, warm 0.1, reference 1.5, cross-encoder 0.2
    got = break_even(
        {
            "cold": 0.5,
            "warm": 0.1,
            "reference": 1.5,
            "cross-encoder": 0.2,
            "store": 0.1,
            "store_build": 0.4,
        }
    )
    assert got["uses_to_beat_reference"] == 1.0  # cold alone is faster
    # (0.5 + (k-1) 0.1) / k <= 0.2  <=>  k >= 4
    assert got["uses_to_beat_cross-encoder"] == 4.0
    # (0.5 + (k-1) 0.1) / k <= 0.1 / 0.9  <=>  k >= 36
    assert got["uses_for_90pct_of_warm"] == 36.0
    assert got["store_pays_after_uses"] == pytest.approx(0.4 / 0.4)
    assert (
        break_even({"cold": 0.5, "warm": 0.3, "cross-encoder": 0.2})[
            "uses_to_beat_cross-encoder"
        ]
        is None
    )


def _row(first: float, warm: float, peers: bool) -> dict:
    row = {
        "queries": 4,
        "hit_ceiling": 0.5,
        "plugin": {
            "first_pass": {"pairs_per_s": first, "hit_rate": 0.5},
            "warm_pass": {"pairs_per_s": warm},
        },
        "store": {"store_pass": {"pairs_per_s": warm * 1.1}},
    }
    if peers:
        row["cold"] = {"subset_pass": {"pairs_per_s": first / 2}}
        row["reference"] = {"subset_pass": {"pairs_per_s": first / 4}}
        row["cross-encoder"] = {"subset_pass": {"pairs_per_s": first / 8}}
    return row


def test_derived_table_and_plot_of_a_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # [bench], installed by scripts/setup.sh
    report = {
        "machine": {"cpu": "test CPU", "cores": 2},
        "dtype": "float32",
        "sections": {
            "256": {
                "doc_tokens": 256,
                "store_build": {"passages": 8, "passages_per_s": 2.0},
                "by_documents": {
                    "16": _row(4.0, 8.0, True),
                    "100": _row(5.0, 9.0, True),
                    "400": _row(6.0, 9.5, False),
                },
                "http": {
                    "documents": 100,
                    "clients": 16,
                    "first_pass": {"pairs_per_s": 4.5},
                    "warm_pass": {"pairs_per_s": 9.0},
                },
            }
        },
    }
    derived(report)
    row = report["sections"]["256"]["by_documents"]["100"]
    assert row["warm_over"] == {
        "reference": pytest.approx(9.0 / 1.25),
        "cross-encoder": pytest.approx(9.0 / 0.625),
    }
    assert report["sections"]["256"]["http"]["over_offline"] == {
        "first_pass": pytest.approx(0.9),
        "warm_pass": pytest.approx(1.0),
    }
    assert report["sections"]["256"]["by_documents"]["400"]["break_even"] is None
    table = summary_table(report)
    assert "| 256 | 100 | 4 | 50.0% (50.0%) | 5.00 | 9.00 | 9.90 | 2.50 |" in table
    assert "(0.90× offline)" in table
    out = tmp_path / "plot.png"
    plot(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
